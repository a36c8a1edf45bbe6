#!/usr/bin/env python3
"""Where two callgrind profiles of the same program differ, function by function.

    python3 benches/callgrind_diff.py [--per N] [--exclusive] [--top K] [--show FN]... BEFORE AFTER

Runs `callgrind_annotate` on both files (inclusive costs unless
--exclusive), matches functions by name (the object file in brackets
dropped; unnamed addresses skipped, since they differ between builds and
runs) and prints the K largest differences AFTER - BEFORE, divided by N
(e.g. the transactions each run made, to read them per transaction). The
totals are printed first. --show FN prints those functions' rows whatever
their rank (repeat it for several).

Why: `benches/guard_cost.sh --profiles DIR` keeps the backend's profile of a
proxy-mode run and of a guard-mode run of the same transactions; their
difference, function by function, is what the database guard costs the
server, and which of its parts (the guard's statement, the PL/pgSQL call,
the read of the mark, the subtransaction) a change could remove.
Functions a run calls only once (loading PL/pgSQL, compiling the guard)
show too, divided by N like the rest: read them as one-off costs.
"""

import argparse
import re
import subprocess
import sys

ROW = re.compile(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*)$")


def costs(path, exclusive):
    """Function name -> instructions, from callgrind_annotate."""
    args = ["callgrind_annotate", "--threshold=100"]
    if not exclusive:
        args.append("--inclusive=yes")
    out = subprocess.run(args + [path], check=True, capture_output=True, text=True).stdout
    found, total = {}, None
    for line in out.splitlines():
        m = ROW.match(line)
        if not m:
            continue
        n = int(m.group(1).replace(",", ""))
        name = re.sub(r"\s*\[.*\]$", "", m.group(2).strip()).replace("???:", "")
        if name == "PROGRAM TOTALS":
            total = n
            continue
        if "0x0" in name:
            continue
        found[name] = found.get(name, 0) + n
    return total, found


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--per", type=float, default=1.0, help="divide by this (e.g. transactions)")
    ap.add_argument("--exclusive", action="store_true", help="self costs, not inclusive")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--show", action="append", default=[], metavar="FN", help="also this function (repeatable)")
    a = ap.parse_args()
    if a.per <= 0:
        sys.exit("--per: a positive number")
    tb, b = costs(a.before, a.exclusive)
    ta, f = costs(a.after, a.exclusive)
    print(f"totals: before {tb / a.per:,.0f}  after {ta / a.per:,.0f}  difference {(ta - tb) / a.per:+,.0f}")
    diffs = sorted(((f.get(k, 0) - b.get(k, 0), k) for k in set(b) | set(f)), reverse=True)
    kind = "self" if a.exclusive else "inclusive"
    print(f"{'difference':>12} {'after':>12} {'before':>12}  function ({kind}, per {a.per:g})")
    shown = diffs[: a.top] + [d for d in diffs if d[1] in a.show and d not in diffs[: a.top]]
    for d, k in shown:
        print(f"{d / a.per:+12,.0f} {f.get(k, 0) / a.per:12,.0f} {b.get(k, 0) / a.per:12,.0f}  {k}")


if __name__ == "__main__":
    main()
