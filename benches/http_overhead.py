#!/usr/bin/env python3
"""Parses wrk output for benches/http_overhead.sh; writes the CSV, JSON and
SVG chart and prints the table of medians. Standard library only.

    python3 benches/http_overhead.py report --manifest M --out DIR \
        [--meta k=v ...] [--memory k=v ...]
    python3 benches/http_overhead.py parse WRK_OUTPUT_FILE     # one run, as JSON
    python3 benches/http_overhead.py load --port P --requests N [--connections C]
        # N keep-alive PUTs (64 bytes, Fencing-Token: 1), for callgrind
    python3 benches/http_overhead.py callgrind-total FILE...   # total Ir of dumps
"""

import argparse
import csv
import json
import os
import re
import socket
import statistics
import sys
from html import escape

# The targets, in the order the script measures them; proxies are all but
# `direct`. A fencepost target is compared with the nginx target of the
# same worker count (`fencepost-2w` with `nginx-2w`).
TARGETS = ["direct", "nginx-1w", "fencepost-1w", "nginx-2w", "fencepost-2w"]
PROXIES = TARGETS[1:]
COLORS = {"direct": "#888888", "nginx-1w": "#2b8a3e", "fencepost-1w": "#1c5fb8",
          "nginx-2w": "#8fd19e", "fencepost-2w": "#8ab4f0"}

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text):
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"unreadable latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(text):
    """Requests/sec, p50/p90/p99 latency (ms), request count, errors."""
    out = {"rps": None, "p50_ms": None, "p75_ms": None, "p90_ms": None, "p99_ms": None,
           "requests": None, "non2xx": 0, "socket_errors": 0}
    m = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    if m:
        out["rps"] = float(m.group(1))
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.M)
        if m:
            out[f"p{pct}_ms"] = _ms(m.group(1))
    m = re.search(r"^\s+(\d+) requests in", text, re.M)
    if m:
        out["requests"] = int(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        out["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["socket_errors"] = sum(int(g) for g in m.groups())
    if out["rps"] is None or out["p99_ms"] is None:
        raise ValueError("not wrk --latency output:\n" + text[:2000])
    return out


_TEXT_KEYS = {"fencepost_commit", "kernel", "nginx", "wrk", "loadavg_start", "loadavg_end"}


def _kv(pairs):
    res = {}
    for p in pairs or []:
        k, _, v = p.partition("=")
        try:
            res[k] = v if k in _TEXT_KEYS else int(v)
        except ValueError:
            res[k] = v
    return res


def load_runs(manifest):
    runs = []
    with open(manifest, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            with open(row["file"]) as g:
                parsed = parse_wrk(g.read())
            run = {
                "phase": row["phase"],
                "workload": row["workload"],
                "target": row["target"],
                "connections": int(row["connections"]),
                "round": int(row["round"]),
                **parsed,
                "rss_after_kb": int(row["rss_after_kb"]) if row["rss_after_kb"] else None,
            }
            runs.append(run)
    return runs


def summarize(runs, phase, key):
    """{group: {target: {rps, p50_ms, p99_ms, n}}} of medians, group by `key`."""
    groups = {}
    for r in runs:
        if r["phase"] != phase:
            continue
        g = r[key]
        groups.setdefault(g, {}).setdefault(r["target"], []).append(r)
    out = {}
    for g, by_target in groups.items():
        out[g] = {}
        for t, rs in by_target.items():
            out[g][t] = {
                "n": len(rs),
                "rps": statistics.median(x["rps"] for x in rs),
                "p50_ms": statistics.median(x["p50_ms"] for x in rs),
                "p99_ms": statistics.median(x["p99_ms"] for x in rs),
                "rps_min": min(x["rps"] for x in rs),
                "rps_max": max(x["rps"] for x in rs),
                "non2xx": sum(x["non2xx"] for x in rs),
                "socket_errors": sum(x["socket_errors"] for x in rs),
            }
        d = out[g].get("direct")
        for t in PROXIES:
            s = out[g].get(t)
            if d and s:
                s["rps_ratio"] = s["rps"] / d["rps"]
                s["p50_ratio"] = s["p50_ms"] / d["p50_ms"] if d["p50_ms"] else None
                s["p99_ratio"] = s["p99_ms"] / d["p99_ms"] if d["p99_ms"] else None
                s["p50_added_ms"] = s["p50_ms"] - d["p50_ms"]
                s["p99_added_ms"] = s["p99_ms"] - d["p99_ms"]
        for t in PROXIES:
            s = out[g].get(t)
            n = out[g].get(t.replace("fencepost", "nginx"))
            if t.startswith("fencepost") and s and n:
                s["rps_vs_nginx"] = s["rps"] / n["rps"]
    return out


def _fmt_ms(v):
    return f"{v * 1000:.0f}us" if v < 1 else f"{v:.2f}ms"


def print_table(title, summary, label, order=None):
    print(f"\n{title}")
    hdr = (f"{label:<10} {'target':<13} {'req/s':>10} {'p50':>9} {'p99':>9} {'req/s/direct':>13} "
           f"{'vs nginx':>9} {'p99/direct':>11} {'errors':>7}")
    print(hdr)
    print("-" * len(hdr))
    for g in order or sorted(summary):
        for t in TARGETS:
            s = summary[g].get(t)
            if not s:
                continue
            rr = f"{s['rps_ratio']:.3f}" if "rps_ratio" in s else "1"
            pr = f"{s['p99_ratio']:.2f}" if s.get("p99_ratio") else "1"
            vn = f"{s['rps_vs_nginx']:.3f}" if "rps_vs_nginx" in s else ""
            errs = s["non2xx"] + s["socket_errors"]
            print(f"{str(g):<10} {t:<13} {s['rps']:>10.0f} {_fmt_ms(s['p50_ms']):>9} "
                  f"{_fmt_ms(s['p99_ms']):>9} {rr:>13} {vn:>9} {pr:>11} {errs:>7}")


def print_latency(summary):
    """The latency each proxy adds to direct at one connection."""
    print("\nAdded latency at 1 connection (target - direct, medians)")
    hdr = f"{'workload':<10} {'target':<13} {'p50':>9} {'p99':>9} {'added p50':>10} {'added p99':>10}"
    print(hdr)
    print("-" * len(hdr))
    for g in [w for w in ("GET", "PUT") if w in summary]:
        for t in TARGETS:
            s = summary[g].get(t)
            if not s:
                continue
            a50 = f"{s['p50_added_ms'] * 1000:+.0f}us" if "p50_added_ms" in s else ""
            a99 = f"{s['p99_added_ms'] * 1000:+.0f}us" if "p99_added_ms" in s else ""
            print(f"{g:<10} {t:<13} {_fmt_ms(s['p50_ms']):>9} {_fmt_ms(s['p99_ms']):>9} {a50:>10} {a99:>10}")


# ------------------------------------------------------------------ chart


def bar_panel(x0, y0, w, h, title, groups, series, value, ymax_floor, fmt):
    """A grouped bar chart with a dashed line at 1.0 (= direct)."""
    parts = []
    vals = [value(g, s) for g in groups for s in series if value(g, s) is not None]
    ymax = max([ymax_floor] + vals) * 1.15
    left, bottom, top = 48, 34, 30
    pw, ph = w - left - 12, h - bottom - top
    ox, oy = x0 + left, y0 + top + ph  # origin (bottom-left of plot area)

    def Y(v):
        return oy - (v / ymax) * ph

    parts.append(f'<text x="{x0 + w / 2}" y="{y0 + 18}" text-anchor="middle" '
                 f'font-size="14" font-weight="bold">{escape(title)}</text>')
    # grid and y ticks
    step = _nice_step(ymax)
    t = 0.0
    while t <= ymax + 1e-9:
        parts.append(f'<line x1="{ox}" y1="{Y(t):.1f}" x2="{ox + pw}" y2="{Y(t):.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{ox - 6}" y="{Y(t) + 4:.1f}" text-anchor="end" font-size="11">{t:g}</text>')
        t += step
    parts.append(f'<line x1="{ox}" y1="{Y(1):.1f}" x2="{ox + pw}" y2="{Y(1):.1f}" '
                 f'stroke="#555" stroke-dasharray="5,4"/>')
    parts.append(f'<text x="{ox + pw + 2}" y="{Y(1) + 3:.1f}" text-anchor="start" font-size="9" '
                 f'fill="#555">1</text>')
    gw = pw / max(1, len(groups))
    bw = gw * 0.7 / max(1, len(series))
    for i, g in enumerate(groups):
        gx = ox + i * gw + gw * 0.15
        for j, s in enumerate(series):
            v = value(g, s)
            if v is None:
                continue
            bx = gx + j * bw
            parts.append(f'<rect x="{bx:.1f}" y="{Y(v):.1f}" width="{bw - 2:.1f}" '
                         f'height="{oy - Y(v):.1f}" fill="{COLORS[s]}"><title>{escape(str(g))} '
                         f'{s}: {fmt(v)}</title></rect>')
            parts.append(f'<text x="{bx + (bw - 2) / 2:.1f}" y="{Y(v) - 3:.1f}" text-anchor="middle" '
                         f'font-size="10">{fmt(v)}</text>')
        parts.append(f'<text x="{ox + i * gw + gw / 2:.1f}" y="{oy + 16}" text-anchor="middle" '
                     f'font-size="12">{escape(str(g))}</text>')
    parts.append(f'<line x1="{ox}" y1="{oy}" x2="{ox + pw}" y2="{oy}" stroke="#000"/>')
    parts.append(f'<line x1="{ox}" y1="{oy}" x2="{ox}" y2="{oy - ph}" stroke="#000"/>')
    return parts


def _nice_step(ymax):
    for s in (0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 20, 50):
        if ymax / s <= 8:
            return s
    return 100


def write_svg(path, main, sweep, meta):
    W, H = 960, 720
    pw, ph = W / 2, 300
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" font-family="sans-serif">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="17" font-weight="bold">'
             f'fencepost HTTP overhead: proxies relative to direct upstream (medians)</text>']
    workloads = [w for w in ("GET", "PUT") if w in main]
    conns = sorted(sweep)

    def val(summary, key):
        return lambda g, s: summary.get(g, {}).get(s, {}).get(key)

    def ratio(v):
        return f"{v:.2f}"

    c = meta.get("connections", "")
    panels = [
        (0, 40, f"req/s ratio (higher is better), {c} conns", workloads, val(main, "rps_ratio"), 1.0),
        (pw, 40, f"p99 latency ratio (lower is better), {c} conns", workloads, val(main, "p99_ratio"), 1.0),
        (0, 40 + ph, "PUT req/s ratio by connections", [str(x) for x in conns],
         lambda g, s: sweep.get(int(g), {}).get(s, {}).get("rps_ratio"), 1.0),
        (pw, 40 + ph, "PUT p99 ratio by connections", [str(x) for x in conns],
         lambda g, s: sweep.get(int(g), {}).get(s, {}).get("p99_ratio"), 1.0),
    ]
    for x0, y0, title, groups, fn, floor in panels:
        if groups:
            parts += bar_panel(x0, y0, pw, ph, title, groups, PROXIES, fn, floor, ratio)
    # legend and footnote
    ly = 40 + 2 * ph + 22
    lx = 60
    for s in PROXIES:
        parts.append(f'<rect x="{lx}" y="{ly - 11}" width="14" height="14" fill="{COLORS[s]}"/>')
        parts.append(f'<text x="{lx + 20}" y="{ly}" font-size="13">{s}</text>')
        lx += 120
    note = (f"wrk -t1 --latency, {meta.get('rounds')} rounds x {meta.get('duration_s')} s interleaved "
            f"(sweep {meta.get('sweep_rounds')} rounds); {meta.get('cpus')} CPUs for wrk, proxy "
            f"and upstream; -1w/-2w: nginx worker processes, fencepost relay workers; dashed line = direct")
    parts.append(f'<text x="60" y="{ly + 22}" font-size="11" fill="#444">{escape(note)}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


# ------------------------------------------------------------------ main


def load(port, requests, connections):
    """`requests` PUTs of 64 bytes with `Fencing-Token: 1`, round-robin over
    `connections` keep-alive connections, each answer read whole; fails on
    any status but 200."""
    req = (b"PUT /item HTTP/1.1\r\nHost: bench\r\nFencing-Token: 1\r\n"
           b"Content-Type: text/plain\r\nContent-Length: 64\r\n\r\n" + b"x" * 64)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(connections)]
    bufs = [b""] * connections
    for i in range(requests):
        c = i % connections
        socks[c].sendall(req)
        buf = bufs[c]
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                head = buf[:end].decode("latin-1")
                m = re.search(r"(?im)^content-length:\s*(\d+)", head)
                total = end + 4 + (int(m.group(1)) if m else 0)
                if len(buf) >= total:
                    if not head.startswith("HTTP/1.1 200"):
                        sys.exit(f"PUT answered {head.splitlines()[0]!r}")
                    bufs[c] = buf[total:]
                    break
            chunk = socks[c].recv(65536)
            if not chunk:
                sys.exit("the proxy closed a connection")
            buf += chunk
    for s in socks:
        s.close()


def callgrind_total(files):
    """Instructions (Ir) in callgrind dumps: each dump's `summary:` (or
    `totals:`) line, summed over the dumps (one per thread or per dump)."""
    total = 0
    for name in files:
        with open(name) as f:
            found = None
            for line in f:
                if line.startswith("summary:") or (found is None and line.startswith("totals:")):
                    found = int(line.split()[1])
            total += found or 0
    return total


def report(args):
    runs = load_runs(args.manifest)
    meta = _kv(args.meta)
    memory = _kv(args.memory)
    main = summarize(runs, "main", "workload")
    latency = summarize(runs, "latency", "workload")
    sweep = summarize(runs, "sweep", "connections")
    os.makedirs(args.out, exist_ok=True)

    fields = ["phase", "workload", "target", "connections", "round", "rps", "p50_ms", "p75_ms",
              "p90_ms", "p99_ms", "requests", "non2xx", "socket_errors", "rss_after_kb"]
    with open(os.path.join(args.out, "http_overhead.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(runs)
    doc = {
        "meta": meta,
        "memory_kb": memory,
        "medians": {"by_workload": main, "one_connection": latency,
                    "put_by_connections": {str(k): v for k, v in sweep.items()}},
        "runs": runs,
    }
    with open(os.path.join(args.out, "http_overhead.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    write_svg(os.path.join(args.out, "http_overhead.svg"), main, sweep, meta)

    c = meta.get("connections")
    print_table(f"Medians, {c} connections, {meta.get('rounds')} rounds x {meta.get('duration_s')} s "
                f"(wrk -t1 --latency)", main, "workload", [w for w in ("GET", "PUT") if w in main])
    print_latency(latency)
    if sweep:
        print_table(f"PUT by connection count, medians of {meta.get('sweep_rounds')} rounds", sweep,
                    "conns", sorted(sweep))
    cg = {k: v for k, v in meta.items() if k.startswith("callgrind_") and k.endswith("_per_put")}
    if cg:
        print(f"\nInstructions per proxied PUT (callgrind, {meta.get('requests')} PUTs, user space):")
        for k, v in cg.items():
            print(f"  {k[len('callgrind_'):-len('_per_put')]:<12} {v:>10}")
    print("\nResident memory (VmRSS, kB):")
    for k, v in memory.items():
        print(f"  {k:<30} {v:>8}")
    if "loadavg_start" in meta:
        print(f"\nload average: {meta['loadavg_start']} before the load, {meta.get('loadavg_end')} after "
              f"({meta.get('cpus')} CPUs)")
    bad = [r for r in runs if r["non2xx"] or r["socket_errors"]]
    if bad:
        print(f"\nWARNING: {len(bad)} run(s) had non-2xx responses or socket errors; see "
              f"http_overhead.csv", file=sys.stderr)
    print(f"\nwrote {args.out}/http_overhead.{{csv,json,svg}} and http_overhead_wrk.txt")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report")
    r.add_argument("--manifest", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--meta", nargs="*")
    r.add_argument("--memory", nargs="*")
    p = sub.add_parser("parse")
    p.add_argument("file")
    lo = sub.add_parser("load")
    lo.add_argument("--port", type=int, required=True)
    lo.add_argument("--requests", type=int, required=True)
    lo.add_argument("--connections", type=int, default=8)
    ct = sub.add_parser("callgrind-total")
    ct.add_argument("files", nargs="+")
    args = ap.parse_args()
    if args.cmd == "report":
        report(args)
    elif args.cmd == "load":
        load(args.port, args.requests, args.connections)
    elif args.cmd == "callgrind-total":
        print(callgrind_total(args.files))
    else:
        with open(args.file) as f:
            print(json.dumps(parse_wrk(f.read()), indent=2))


if __name__ == "__main__":
    main()
