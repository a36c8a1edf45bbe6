#!/usr/bin/env python3
"""Totals of a tier checker campaign, from its log (the output of
benches/checker_tier_campaign.sh, or of the checker tests run with
--nocapture / --no-capture, each batch headed `=== batch MODE seed N`).

A run counts when its verdict line (`violations: N`) was printed; runs
that started but printed none (set-up failures, a loop cut off) are listed
apart with the first line of their panic. Prints runs per mode, faults per
kind, grants and failovers, writes per protocol, audit figures, violations
and the seed ranges judged.

    python3 benches/checker_tier_totals.py [LOG]
"""
import collections
import re
import sys


def parse(lines):
    runs, cur, mode = [], None, None
    for line in lines:
        m = re.match(r"=== batch (\w+) seed (\d+) start", line)
        if m:
            mode = m.group(1)
            continue
        m = re.match(r"tier run, seed (\d+):", line)
        if m:
            cur = {"seed": int(m.group(1)), "mode": mode, "violations": None}
            runs.append(cur)
            continue
        if cur is None:
            continue
        if "panicked at" in line and cur["violations"] is None:
            cur["why"] = ""
        elif cur.get("why") == "":
            cur["why"] = line.strip()[:100]
        m = re.match(r"faults: (.*?); psql", line)
        if m:
            cur["faults"] = {
                k: int(v) for k, v in (x.rsplit(" ", 1) for x in m.group(1).split(", "))
            }
        m = re.match(r"grants: (\d+) \((\d+) failovers", line)
        if m:
            cur["grants"], cur["failovers"] = int(m.group(1)), int(m.group(2))
        m = re.match(
            r"(http|postgres): writes (\d+) admitted (\d+) refused \{(.*?)\} unknown (\d+); landed (\d+)",
            line,
        )
        if m:
            refused = {
                k.strip('"'): int(v)
                for k, v in (x.split(": ") for x in m.group(4).split(", ") if x)
            }
            cur[m.group(1)] = {
                "writes": int(m.group(2)),
                "admitted": int(m.group(3)),
                "refused": refused,
                "unknown": int(m.group(5)),
            }
        m = re.match(
            r"refusals audited (\d+), lost to kill -9 (\d+) .*dropped batches (\d+)", line
        )
        if m:
            cur["audited"], cur["lost_kill"], cur["lost_sink"] = map(int, m.groups())
        m = re.match(r"violations: (\d+)", line)
        if m:
            cur["violations"] = int(m.group(1))
        m = re.match(r"writes sent after a lapse of their replica's lease .*: (\d+)", line)
        if m:
            cur["late"] = int(m.group(1))
    return runs


def ranges(seeds):
    out = []
    for s in sorted(seeds):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in out) or "none"


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "target/checker_tier_campaign.log"
    with open(path, errors="replace") as f:
        runs = parse(f.read().splitlines())
    judged = [r for r in runs if r["violations"] is not None]
    cut = [r for r in runs if r["violations"] is None]
    by_mode = collections.Counter(r["mode"] for r in judged)
    print(f"runs judged: {len(judged)} ({', '.join(f'{k} {v}' for k, v in sorted(by_mode.items()))})")
    why = collections.Counter(r.get("why") or "cut off before a verdict" for r in cut)
    for k, v in why.most_common():
        print(f"  not judged: {v}: {k}")
    faults = collections.Counter()
    for r in judged:
        faults.update(r.get("faults", {}))
    print(f"faults: {sum(faults.values())} ({', '.join(f'{k} {v}' for k, v in sorted(faults.items()))})")
    print(
        f"grants: {sum(r.get('grants', 0) for r in judged)} "
        f"({sum(r.get('failovers', 0) for r in judged)} failovers)"
    )
    for p in ("http", "postgres"):
        of = [r[p] for r in judged if p in r]
        refused = collections.Counter()
        for x in of:
            refused.update(x["refused"])
        print(
            f"{p}: writes {sum(x['writes'] for x in of)}, admitted {sum(x['admitted'] for x in of)}, "
            f"refused {dict(sorted(refused.items()))}, outcome unknown {sum(x['unknown'] for x in of)}"
        )
    print(
        f"refusals audited {sum(r.get('audited', 0) for r in judged)}; records lost to kill -9 "
        f"{sum(r.get('lost_kill', 0) for r in judged)}, to the sink's dropped batches "
        f"{sum(r.get('lost_sink', 0) for r in judged)}"
    )
    late = [r for r in judged if r.get("late")]
    print(
        f"writes sent after a lapse of their replica's lease (the residue, as logged): "
        f"{sum(r.get('late', 0) for r in judged)} in {len(late)} runs {[r['seed'] for r in late]}"
    )
    bad = [r for r in judged if r["violations"]]
    print(f"violations: {sum(r['violations'] for r in judged)} in {len(bad)} runs {[r['seed'] for r in bad]}")
    for m in sorted(by_mode):
        print(f"seeds judged, {m}: {ranges(r['seed'] for r in judged if r['mode'] == m)}")


if __name__ == "__main__":
    main()
