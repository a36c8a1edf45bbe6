#!/usr/bin/env python3
"""What durable audit costs the refusal path: p50/p99 of a 409.

    python3 benches/audit_refusal.py --before BIN --after BIN
                                     [--rounds 5] [--requests 2000]
                                     [--connections 8] [--store sqlite|URL]

BIN is a `fencepost` binary: --before one built from the commit before
"Durable before answered" (records queued in memory, the 409 sent at
once), --after one from that commit on (the 409 waits for the record's
group commit). Each binary runs `fencepost serve` with an HTTP proxy in
front of a tiny upstream, on loopback ports picked here, over a fresh
SQLite file in a temporary directory (or the Postgres URL given, whose
audit table is shared, so use a throwaway database). The resource's mark
is set to 10 once; then every request is a stale PUT (token 3), refused
with 409 and audited, from C client threads on keep-alive connections.

The two binaries run interleaved, round after round, so drift hits both
alike. Output: a table on stdout and benches/results/audit_refusal.json
(every round's p50/p99/throughput, the medians and the after/before
ratios). Standard library only.
"""

import argparse
import http.client
import http.server
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_PUT(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def start_upstream():
    port = free_port()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), Upstream)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, port


def start_server(binary, workdir, store, upstream_port):
    admin, proxy = free_port(), free_port()
    os.makedirs(workdir, exist_ok=True)
    if store == "sqlite":
        store = "sqlite://%s/fp.db" % workdir
    cfg = os.path.join(workdir, "fencepost.toml")
    with open(cfg, "w") as f:
        f.write(
            'store = "%s"\n[admin]\nlisten = "127.0.0.1:%d"\n'
            '[[http]]\nlisten = "127.0.0.1:%d"\nupstream = "http://127.0.0.1:%d"\n'
            % (store, admin, proxy, upstream_port)
        )
    log = open(os.path.join(workdir, "serve.log"), "w")
    p = subprocess.Popen(
        [binary, "serve", "--config", cfg], cwd=workdir, stdout=subprocess.DEVNULL, stderr=log
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", admin, timeout=2)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                break
        except OSError:
            time.sleep(0.05)
    else:
        p.kill()
        sys.exit("%s did not start; see %s/serve.log" % (binary, workdir))
    return p, proxy


def put(conn, resource, token):
    conn.request(
        "PUT",
        "/kv/bench",
        body=b"x",
        headers={"Fencing-Token": str(token), "Fencing-Resource": resource},
    )
    r = conn.getresponse()
    r.read()
    return r.status


def round_of(proxy, resource, requests, connections):
    lat = []
    lock = threading.Lock()
    left = [requests]

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", proxy, timeout=30)
        mine = []
        while True:
            with lock:
                if left[0] == 0:
                    break
                left[0] -= 1
            t = time.perf_counter()
            s = put(conn, resource, 3)
            mine.append(time.perf_counter() - t)
            if s != 409:
                sys.exit("expected 409, got %d" % s)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(connections)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1000
    return {"p50_ms": q(0.50), "p99_ms": q(0.99), "per_s": len(lat) / wall}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--store", default="sqlite")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="fp-audit-bench-")
    up, up_port = start_upstream()
    servers = {}
    try:
        for name in ("before", "after"):
            p, proxy = start_server(getattr(a, name), os.path.join(tmp, name), a.store, up_port)
            servers[name] = (p, proxy)
            c = http.client.HTTPConnection("127.0.0.1", proxy, timeout=10)
            resource = "bench-" + name
            if put(c, resource, 10) != 200:
                sys.exit("%s: token 10 not admitted" % name)
            round_of(proxy, resource, 200, a.connections)  # warm-up
        runs = {"before": [], "after": []}
        for i in range(a.rounds):
            for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
                r = round_of(servers[name][1], "bench-" + name, a.requests, a.connections)
                runs[name].append(r)
                print("round %d %-6s p50 %.3f ms  p99 %.3f ms  %.0f/s" % (i + 1, name, r["p50_ms"], r["p99_ms"], r["per_s"]))
        med = {
            n: {k: statistics.median(x[k] for x in runs[n]) for k in ("p50_ms", "p99_ms", "per_s")}
            for n in runs
        }
        ratio = {k: med["after"][k] / med["before"][k] for k in med["after"]}
        print()
        print("%-7s %10s %10s %10s" % ("", "p50 ms", "p99 ms", "409/s"))
        for n in ("before", "after"):
            print("%-7s %10.3f %10.3f %10.0f" % (n, med[n]["p50_ms"], med[n]["p99_ms"], med[n]["per_s"]))
        print("%-7s %10.2f %10.2f %10.2f" % ("ratio", ratio["p50_ms"], ratio["p99_ms"], ratio["per_s"]))
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "audit_refusal.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(
                {
                    "settings": vars(a),
                    "runs": runs,
                    "median": med,
                    "ratio_after_to_before": ratio,
                    "cpus": os.cpu_count(),
                    "load_avg_at_end": os.getloadavg(),
                },
                f,
                indent=2,
            )
        print("\nwrote", out)
    finally:
        for p, _ in servers.values():
            p.terminate()
            p.wait()
        up.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
