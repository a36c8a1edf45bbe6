#!/usr/bin/env python3
"""Helpers for benches/pg_overhead.sh: parses pgbench output and its
per-transaction logs (--log), writes the CSV, JSON and SVG chart and prints
the table of medians; and holds N idle Postgres connections open, or writes
to N distinct resources, through fencepost (needs psycopg 3).

    python3 benches/pg_overhead.py report --manifest M --out DIR [--meta k=v ...] [--memory k=v ...]
    python3 benches/pg_overhead.py parse PGBENCH_OUTPUT LOG_DIR      # one run, as JSON
    python3 benches/pg_overhead.py hold --dsn DSN --count N --ready FILE --seconds S
    python3 benches/pg_overhead.py resources --dsn DSN --count N [--threads T]
    python3 benches/pg_overhead.py paired CSV [CSV ...] [--fp T] [--base T ...] [--clients C]

The chart reuses the bar panels of benches/http_overhead.py.
"""

import argparse
import csv
import glob
import json
import math
import os
import re
import statistics
import sys
import threading
import time
from html import escape

sys.dont_write_bytecode = True  # no __pycache__ in benches/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import http_overhead as hx  # noqa: E402  (bar_panel, _kv)

TARGETS = ["direct", "relay", "pgbouncer", "fp-proxy", "fp-guard", "fp-guard-c", "fp-tokio", "fp-variant"]
PROXIES = ["relay", "pgbouncer", "fp-proxy", "fp-guard", "fp-guard-c", "fp-tokio", "fp-variant"]
COLORS = {"direct": "#888888", "relay": "#e8590c", "pgbouncer": "#2b8a3e", "fp-proxy": "#1c5fb8",
          "fp-guard": "#7048e8", "fp-guard-c": "#be4bdb", "fp-tokio": "#74c0fc", "fp-variant": "#15aabf"}
MODES = ["simple", "extended", "prepared"]
hx.COLORS.update(COLORS)
hx._TEXT_KEYS.update({"pgbouncer", "postgres", "pgbench", "sweep_skipped"})


def _p(sorted_vals, q):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(q * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[i]


def parse_run(out_file, log_dir):
    """TPS and average latency from pgbench's summary; p50/p99 from its
    per-transaction logs (column 3 is the latency in microseconds)."""
    with open(out_file) as f:
        text = f.read()
    res = {"tps": None, "lat_avg_ms": None, "p50_ms": None, "p99_ms": None, "xacts": 0, "failed": 0}
    m = re.search(r"^tps = ([0-9.]+) \(without initial connection time\)", text, re.M)
    if m:
        res["tps"] = float(m.group(1))
    m = re.search(r"^latency average = ([0-9.]+) ms", text, re.M)
    if m:
        res["lat_avg_ms"] = float(m.group(1))
    m = re.search(r"^number of failed transactions: (\d+)", text, re.M)
    if m:
        res["failed"] = int(m.group(1))
    if res["tps"] is None or res["lat_avg_ms"] is None:
        raise ValueError(f"not pgbench output ({out_file}):\n" + text[:2000])
    lats = []
    for path in glob.glob(os.path.join(log_dir, "pgbench_log.*")):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    lats.append(int(parts[2]))
    lats.sort()
    res["xacts"] = len(lats)
    if lats:
        res["p50_ms"] = _p(lats, 0.50) / 1000.0
        res["p99_ms"] = _p(lats, 0.99) / 1000.0
    return res


def load_runs(manifest):
    runs = []
    with open(manifest, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            parsed = parse_run(row["out"], row["logdir"])
            runs.append({
                "phase": row["phase"],
                "workload": row["workload"],
                "target": row["target"],
                "clients": int(row["clients"]),
                "round": int(row["round"]),
                **parsed,
                "rss_after_kb": int(row["rss_after_kb"]) if row["rss_after_kb"] else None,
            })
    return runs


def summarize(runs, phase, key):
    groups = {}
    for r in runs:
        if r["phase"] == phase:
            groups.setdefault(r[key], {}).setdefault(r["target"], []).append(r)
    out = {}
    for g, by_target in groups.items():
        out[g] = {}
        for t, rs in by_target.items():
            p99s = [x["p99_ms"] for x in rs if x["p99_ms"] is not None]
            out[g][t] = {
                "n": len(rs),
                "tps": statistics.median(x["tps"] for x in rs),
                "lat_avg_ms": statistics.median(x["lat_avg_ms"] for x in rs),
                "p99_ms": statistics.median(p99s) if p99s else None,
                "tps_min": min(x["tps"] for x in rs),
                "tps_max": max(x["tps"] for x in rs),
                "failed": sum(x["failed"] for x in rs),
            }
        d = out[g].get("direct")
        for t in PROXIES:
            s = out[g].get(t)
            if d and s:
                s["tps_ratio"] = s["tps"] / d["tps"]
                s["lat_ratio"] = s["lat_avg_ms"] / d["lat_avg_ms"] if d["lat_avg_ms"] else None
                s["p99_ratio"] = s["p99_ms"] / d["p99_ms"] if d["p99_ms"] and s["p99_ms"] else None
    return out


def _ms(v):
    return "-" if v is None else f"{v:.3f}ms"


def print_table(title, summary, label, order):
    print(f"\n{title}")
    hdr = (f"{label:<20} {'target':<10} {'tps':>9} {'lat avg':>10} {'p99':>10} {'tps/direct':>11} "
           f"{'p99/direct':>11} {'vs pgbouncer':>13} {'failed':>7}")
    print(hdr)
    print("-" * len(hdr))
    for g in order:
        b = summary[g].get("pgbouncer")
        for t in TARGETS:
            s = summary[g].get(t)
            if not s:
                continue
            rr = f"{s['tps_ratio']:.3f}" if "tps_ratio" in s else "1"
            pr = f"{s['p99_ratio']:.2f}" if s.get("p99_ratio") else ("1" if t == "direct" else "-")
            vb = f"{s['tps'] / b['tps']:.3f}" if b and t in PROXIES else ""
            print(f"{str(g):<20} {t:<10} {s['tps']:>9.0f} {_ms(s['lat_avg_ms']):>10} {_ms(s['p99_ms']):>10} "
                  f"{rr:>11} {pr:>11} {vb:>13} {s['failed']:>7}")


def issue_rows(clients):
    """Issue 13's rows: (label, workload prefix)."""
    return [(f"select-only, {clients} clients", "select"), (f"TPC-B-like, {clients} clients", "tpcb"),
            ("select-only, 1 client", "select -c1")]


def print_cells(title, clients, cell):
    """A markdown table of issue 13's rows by -M mode, `cell(workload)` in
    each ("-" for none); rows with no cell, and tables with no row, are left
    out."""
    lines = []
    for label, w in issue_rows(clients):
        got = [cell(f"{w} -M {m}") for m in MODES]
        if any(c != "-" for c in got):
            lines.append(f"| {label} | {' | '.join(got)} |")
    if lines:
        print(f"\n{title}")
        print(f"| workload | {' | '.join(MODES)} |")
        print("|---|" + "---|" * len(MODES))
        print("\n".join(lines))


def issue_table(main, clients):
    """Issue 13's table: for each row (select-only and TPC-B-like at the main
    client count, select-only at one client) and -M mode, a fencepost
    target's median TPS as a ratio to PgBouncer's and to the relay's."""
    for fp in ("fp-proxy", "fp-guard", "fp-guard-c", "fp-tokio", "fp-variant"):
        # Guard mode also against proxy mode (issue 11's other ratio).
        bases = ("pgbouncer", "relay") if fp == "fp-proxy" else ("pgbouncer", "relay", "fp-proxy")
        for base in bases:
            def cell(w, fp=fp, base=base):
                a, b = main.get(w, {}).get(fp), main.get(w, {}).get(base)
                return f"{a['tps'] / b['tps']:.2f}" if a and b else "-"
            print_cells(f"{fp} TPS / {base} TPS (medians)", clients, cell)


def median_ci(values, level=0.9):
    """The median of `values` and a distribution-free confidence interval
    for it: the k-th smallest and k-th largest values, k the largest whose
    interval still holds the median with at least `level` (the binomial
    order-statistic interval; it assumes nothing of the spread's shape).
    Returns (median, low, high, confidence); low and high are None when
    there are too few values for `level`."""
    xs = sorted(values)
    n = len(xs)
    med = statistics.median(xs)
    # P(Binomial(n, 1/2) <= j), cumulated.
    cdf, acc = [], 0.0
    for j in range(n + 1):
        acc += math.comb(n, j) / 2 ** n
        cdf.append(acc)
    best = None
    for k in range(1, n // 2 + 1):
        conf = 1 - 2 * cdf[k - 1]
        if conf >= level:
            best = (k, conf)
    if best is None:
        return med, None, None, None
    k, conf = best
    return med, xs[k - 1], xs[n - k], conf


def paired(runs, fp, base):
    """Per workload, `fp`'s TPS over `base`'s in each round, paired: both ran
    in the same round, minutes apart at most, so the machine's drift from one
    minute to the next (up to 1.7x here) cancels out of each ratio, where a
    ratio of medians mixes rounds. Returns {workload: [ratio per round]}."""
    tps = {}
    for r in runs:
        if r["phase"] == "main":
            tps[(r["workload"], r["round"], r["target"])] = r["tps"]
    out = {}
    for (w, rnd, t), v in tps.items():
        if t == fp and (w, rnd, base) in tps and tps[(w, rnd, base)] > 0:
            out.setdefault(w, []).append(v / tps[(w, rnd, base)])
    return out


def paired_table(runs, clients, fp="fp-proxy", bases=("pgbouncer", "relay")):
    """Issue 13's table from paired rounds: per cell the median of the
    per-round ratios, an interval of at least 90 % confidence for it, and in
    how many rounds fp was ahead."""
    for base in bases:
        ratios = paired(runs, fp, base)

        def cell(w, ratios=ratios):
            xs = ratios.get(w)
            if not xs:
                return "-"
            med, lo, hi, _ = median_ci(xs)
            ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None else ""
            return f"{med:.2f}{ci} ({sum(1 for x in xs if x >= 1.0)}/{len(xs)})"
        print_cells(f"{fp} TPS / {base} TPS, paired by round: median [interval of at least 90 % "
                    "confidence] (rounds ahead / rounds)", clients, cell)


def write_svg(path, main, sweep, meta):
    workloads = sorted(main)
    # The targets this run had (fp-tokio only with --with-tokio).
    series = [p for p in PROXIES if any(p in v for v in main.values())]
    conns = sorted(sweep)
    W = max(960, 130 * len(workloads) + 80)
    ph = 300
    H = 40 + 2 * ph + 60
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" font-family="sans-serif">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="17" font-weight="bold">'
             f'fencepost Postgres overhead: pgbench TPS relative to direct (medians)</text>']

    def ratio(v):
        return f"{v:.2f}"

    parts += hx.bar_panel(0, 40, W, ph, f"TPS ratio to direct per workload (higher is better), "
                          f"{meta.get('clients')} clients", workloads, series,
                          lambda g, s: main.get(g, {}).get(s, {}).get("tps_ratio"), 1.0, ratio)
    if conns:
        parts += hx.bar_panel(0, 40 + ph, W / 2, ph, "-S -M prepared: TPS ratio by clients",
                              [str(c) for c in conns], series,
                              lambda g, s: sweep.get(int(g), {}).get(s, {}).get("tps_ratio"), 1.0, ratio)
        parts += hx.bar_panel(W / 2, 40 + ph, W / 2, ph, "-S -M prepared: p99 ratio by clients",
                              [str(c) for c in conns], series,
                              lambda g, s: sweep.get(int(g), {}).get(s, {}).get("p99_ratio"), 1.0, ratio)
    ly = 40 + 2 * ph + 22
    lx = 60
    for s in series:
        parts.append(f'<rect x="{lx}" y="{ly - 11}" width="14" height="14" fill="{COLORS[s]}"/>')
        parts.append(f'<text x="{lx + 20}" y="{ly}" font-size="13">{s}</text>')
        lx += 130
    note = (f"pgbench -c {meta.get('clients')} -j 2, {meta.get('rounds')} rounds x {meta.get('duration_s')} s "
            f"interleaved (sweep {meta.get('sweep_rounds')} round(s)); {meta.get('cpus')} CPUs shared by "
            f"pgbench, proxy and Postgres; dashed line = direct")
    parts.append(f'<text x="60" y="{ly + 22}" font-size="11" fill="#444">{escape(note)}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


def report(args):
    runs = load_runs(args.manifest)
    meta = hx._kv(args.meta)
    memory = hx._kv(args.memory)
    main = summarize(runs, "main", "workload")
    sweep = summarize(runs, "sweep", "clients")
    os.makedirs(args.out, exist_ok=True)
    fields = ["phase", "workload", "target", "clients", "round", "tps", "lat_avg_ms", "p50_ms", "p99_ms",
              "xacts", "failed", "rss_after_kb"]
    with open(os.path.join(args.out, "pg_overhead.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(runs)
    doc = {"meta": meta, "memory_kb": memory,
           "medians": {"by_workload": main, "select_prepared_by_clients": {str(k): v for k, v in sweep.items()}},
           "runs": runs}
    with open(os.path.join(args.out, "pg_overhead.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    write_svg(os.path.join(args.out, "pg_overhead.svg"), main, sweep, meta)
    print_table(f"Medians, pgbench -c {meta.get('clients')} -j 2, {meta.get('rounds')} rounds x "
                f"{meta.get('duration_s')} s", main, "workload", sorted(main))
    issue_table(main, meta.get("clients"))
    paired_table(runs, meta.get("clients"))
    if sweep:
        print_table(f"-S -M prepared by client count, medians of {meta.get('sweep_rounds')} round(s)",
                    sweep, "clients", sorted(sweep))
    if meta.get("sweep_skipped"):
        print(f"\nsweep levels skipped (Postgres max_connections too low): {meta['sweep_skipped']}")
    print("\nfencepost resident memory (VmRSS, kB):")
    for k, v in memory.items():
        print(f"  {k:<36} {v:>8}")
    n = meta.get("idle_conns")
    for who in ("fencepost", "pgbouncer"):
        before, held = memory.get(f"{who}_before_conns_kb"), memory.get(f"{who}_idle_conns_kb")
        if before and held and n:
            print(f"  => {who}: {(held - before) / n:.1f} KiB per idle client connection ({n} connections)")
    r0, r1, nr = memory.get("fencepost_before_resources_kb"), memory.get("fencepost_resources_kb"), meta.get("resources")
    if r0 and r1 and nr:
        print(f"  => {(r1 - r0) * 1024 / nr:.0f} bytes per tracked resource ({nr} resources)")
    bad = [r for r in runs if r["failed"]]
    if bad:
        print(f"\nWARNING: {len(bad)} run(s) had failed transactions; see pg_overhead.csv", file=sys.stderr)
    print(f"\nwrote {args.out}/pg_overhead.{{csv,json,svg}} and pg_overhead_pgbench.txt")


# ------------------------------------------------------------------ clients


def hold(args):
    """Opens `count` real connections (startup, authentication, ReadyForQuery,
    one `SELECT 1` each), reports in `ready`, keeps them idle until killed or
    `seconds` pass."""
    import psycopg
    conns = []
    for i in range(args.count):
        c = psycopg.connect(args.dsn, autocommit=True, connect_timeout=10)
        c.execute("SELECT 1").fetchone()
        conns.append(c)
    with open(args.ready, "w") as f:
        f.write(f"{len(conns)}\n")
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)
    for c in conns:
        c.close()


def resources(args):
    """One fenced write (token 1) to each of `count` distinct resources: one
    connection per resource, named in the startup options, so the statement
    text is the same every time and only the fence table grows (a resource
    named in a leading comment would also add one classifier cache entry per
    distinct text)."""
    import psycopg
    errors = []

    def work(k):
        try:
            for i in range(k, args.count, args.threads):
                opts = f"-c fencing.token=1 -c fencing.resource=bench-res-{i}"
                with psycopg.connect(args.dsn, autocommit=True, connect_timeout=10, options=opts) as c:
                    c.execute("UPDATE pgbench_branches SET bbalance = bbalance WHERE bid = -1")
        except Exception as e:  # reported below
            errors.append(repr(e))

    ts = [threading.Thread(target=work, args=(k,)) for k in range(args.threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        sys.exit("resource writes failed: " + errors[0])


def paired_cmd(args):
    """The paired table over the runs of one or more saved pg_overhead.csv
    files (their rounds pooled: each round is paired within its own file)."""
    runs = []
    for i, path in enumerate(args.csv):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row["phase"] != "main" or not row["tps"]:
                    continue
                runs.append({"phase": "main", "workload": row["workload"], "target": row["target"],
                             "round": f"{i}:{row['round']}", "tps": float(row["tps"])})
    paired_table(runs, args.clients, args.fp, tuple(args.base))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report")
    r.add_argument("--manifest", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--meta", nargs="*")
    r.add_argument("--memory", nargs="*")
    p = sub.add_parser("parse")
    p.add_argument("out")
    p.add_argument("logdir")
    h = sub.add_parser("hold")
    h.add_argument("--dsn", required=True)
    h.add_argument("--count", type=int, required=True)
    h.add_argument("--ready", required=True)
    h.add_argument("--seconds", type=float, default=120)
    s = sub.add_parser("resources")
    s.add_argument("--dsn", required=True)
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--threads", type=int, default=4)
    q = sub.add_parser("paired")
    q.add_argument("csv", nargs="+")
    q.add_argument("--fp", default="fp-proxy")
    q.add_argument("--base", nargs="+", default=["pgbouncer", "relay"])
    q.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    if args.cmd == "report":
        report(args)
    elif args.cmd == "parse":
        print(json.dumps(parse_run(args.out, args.logdir), indent=2))
    elif args.cmd == "hold":
        hold(args)
    elif args.cmd == "paired":
        paired_cmd(args)
    else:
        resources(args)


if __name__ == "__main__":
    main()
