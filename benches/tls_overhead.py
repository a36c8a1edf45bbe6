#!/usr/bin/env python3
"""Report for benches/tls_overhead.sh: medians of the interleaved rounds,
TLS / plaintext for each proxy and fencepost / its peer (nginx, PgBouncer)
under TLS and in plain text; writes tls_overhead.csv and .json. Standard
library only; wrk output is parsed by http_overhead.py's parser.

    python3 benches/tls_overhead.py report --manifest M --out DIR [--meta k=v ...]
"""

import argparse
import csv
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.dont_write_bytecode = True  # no __pycache__ left in benches/
import http_overhead as hx  # noqa: E402  (parse_wrk: one wrk output)

# Per data path: the four targets (peer plain, peer TLS, fencepost plain,
# fencepost TLS) and the figure each workload is compared on.
PATHS = {
    "http": ("nginx", "nginx-tls", "fencepost", "fencepost-tls"),
    "pg": ("pgbouncer", "pgbouncer-tls", "fencepost", "fencepost-tls"),
}


def parse_pgbench(text):
    """TPS (pgbench 15 and 17 name it differently with -C), average latency,
    average connection time (-C) and failed transactions."""
    res = {"tps": None, "lat_avg_ms": None, "conn_ms": None, "failed": 0}
    m = re.search(r"^tps = ([0-9.]+)", text, re.M)
    if m:
        res["tps"] = float(m.group(1))
    m = re.search(r"^latency average = ([0-9.]+) ms", text, re.M)
    if m:
        res["lat_avg_ms"] = float(m.group(1))
    m = re.search(r"^average connection time = ([0-9.]+) ms", text, re.M)
    if m:
        res["conn_ms"] = float(m.group(1))
    m = re.search(r"^number of failed transactions: (\d+)", text, re.M)
    if m:
        res["failed"] = int(m.group(1))
    if res["tps"] is None:
        raise ValueError("not pgbench output:\n" + text[:2000])
    return res


def load_runs(manifest):
    runs = []
    with open(manifest) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            with open(row["file"]) as g:
                text = g.read()
            if row["path"] == "http":
                fig = hx.parse_wrk(text)
                rate = fig["rps"]
                errors = fig["non2xx"] + fig["socket_errors"]
            else:
                fig = parse_pgbench(text)
                rate = fig["tps"]
                errors = fig["failed"]
            runs.append({"path": row["path"], "workload": row["workload"], "target": row["target"],
                         "round": int(row["round"]), "rate": rate, "errors": errors,
                         **{k: v for k, v in fig.items() if k.endswith("_ms")}})
    return runs


def _median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def summarize(runs):
    """One row per (path, workload): median rate per target and the ratios."""
    rows = []
    seen = []
    for r in runs:
        key = (r["path"], r["workload"])
        if key not in seen:
            seen.append(key)
    for path, workload in seen:
        peer, peer_tls, fp, fp_tls = PATHS[path]
        med = {}
        lat = {}
        errors = 0
        for t in PATHS[path]:
            sel = [r for r in runs if r["path"] == path and r["workload"] == workload and r["target"] == t]
            med[t] = _median([r["rate"] for r in sel])
            # p50 for wrk, pgbench's average latency, or the connection time
            # pgbench -C reports: whichever this workload has.
            for k in ("p50_ms", "p99_ms", "lat_avg_ms", "conn_ms"):
                v = _median([r.get(k) for r in sel])
                if v is not None:
                    lat.setdefault(t, {})[k] = v
            errors += sum(r["errors"] for r in sel)
        rows.append({
            "path": path, "workload": workload, "median_rate": med, "median_latency_ms": lat,
            "errors": errors,
            "peer_tls_over_plain": _ratio(med[peer_tls], med[peer]),
            "fencepost_tls_over_plain": _ratio(med[fp_tls], med[fp]),
            "fencepost_over_peer_plain": _ratio(med[fp], med[peer]),
            "fencepost_over_peer_tls": _ratio(med[fp_tls], med[peer_tls]),
        })
    return rows


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


_LAT = {"p50_ms": "p50", "p99_ms": "p99", "lat_avg_ms": "avg", "conn_ms": "connect"}


def print_table(rows):
    print()
    print("Medians (HTTP: requests/s; Postgres: transactions/s; handshake and -C rows: "
          "one new connection per request or transaction)")
    hdr = (f"{'path':<5} {'workload':<24} {'peer':>9} {'peer-tls':>9} {'tls/plain':>9} "
           f"{'fp':>9} {'fp-tls':>9} {'tls/plain':>9} {'fp/peer':>8} {'fp/peer':>8} {'errors':>6}")
    print(hdr)
    print(f"{'':<5} {'':<24} {'':>9} {'':>9} {'(peer)':>9} {'':>9} {'':>9} {'(fp)':>9} "
          f"{'plain':>8} {'tls':>8}")
    for r in rows:
        peer, peer_tls, fp, fp_tls = PATHS[r["path"]]
        m = r["median_rate"]
        print(f"{r['path']:<5} {r['workload']:<24} {_f(m[peer], '.0f'):>9} {_f(m[peer_tls], '.0f'):>9} "
              f"{_f(r['peer_tls_over_plain'], '.3f'):>9} {_f(m[fp], '.0f'):>9} {_f(m[fp_tls], '.0f'):>9} "
              f"{_f(r['fencepost_tls_over_plain'], '.3f'):>9} {_f(r['fencepost_over_peer_plain'], '.3f'):>8} "
              f"{_f(r['fencepost_over_peer_tls'], '.3f'):>8} {r['errors']:>6}")
    print("peer: nginx (http), PgBouncer (pg). tls/plain < 1 is the share of throughput TLS costs.")
    if any(r["errors"] for r in rows):
        print("warning: some runs had errors (non-2xx, socket errors or failed transactions); "
              "those rows do not measure the happy path")
    lat_rows = [r for r in rows if r["median_latency_ms"]]
    if lat_rows:
        print()
        print("Median latency, ms (wrk: p50, p99; pgbench: average latency, and with -C average connection time)")
        for r in lat_rows:
            parts = []
            for t in PATHS[r["path"]]:
                lat = r["median_latency_ms"].get(t, {})
                parts.append(f"{t} " + " ".join(f"{_LAT[k]} {lat[k]:.3f}" for k in _LAT if k in lat))
            print(f"  {r['path']:<5} {r['workload']:<24} " + "; ".join(parts))


def report(args):
    runs = load_runs(args.manifest)
    rows = summarize(runs)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tls_overhead.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "workload", "target", "round", "rate", "errors", "p50_ms", "p99_ms",
                    "lat_avg_ms", "conn_ms"])
        for r in runs:
            w.writerow([r["path"], r["workload"], r["target"], r["round"], r["rate"], r["errors"],
                        r.get("p50_ms"), r.get("p99_ms"), r.get("lat_avg_ms"), r.get("conn_ms")])
    meta = dict(kv.split("=", 1) for kv in args.meta)
    with open(os.path.join(args.out, "tls_overhead.json"), "w") as f:
        json.dump({"meta": meta, "summary": rows, "runs": runs}, f, indent=2)
        f.write("\n")
    print_table(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report")
    r.add_argument("--manifest", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--meta", nargs="*", default=[])
    args = ap.parse_args()
    if args.cmd == "report":
        report(args)


if __name__ == "__main__":
    main()
