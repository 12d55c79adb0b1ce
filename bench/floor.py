#!/usr/bin/env python3
"""Splits a decision's cost into the transport's share and the decision's own.

A check for a domain that the configuration does not name gets an OK
response with no rate-limit headers, and it never reaches the buckets or the
store. Everything else still happens: the HTTP/2 frames are read and written,
the request is decoded and validated, the response is encoded and the call
is counted in the metrics (the per-rule counters excepted, since no rule
matches). So the cost of such a check is a floor that no
faster limiter or store can go below, and the difference to a configured
check is what the decision itself costs.

This script runs one service binary on one benchmark cell, alternately with
checks for the shipped domain and for one that no configuration names, and
reports both medians, their ratio and their difference. A CPU target below
the floor needs a lighter HTTP/2 path, not a faster limiter.

Usage:
  bench/floor.py [--store memory|redis] [--rounds 5] [--seconds 4] [BINARY]
  bench/floor.py --measure instructions [--calls 10000] [BINARY]
Build first: cargo build --release --bins
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402
import matrix  # noqa: E402

UNCONFIGURED = "unconfigured"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary", nargs="?", default=str(matrix.SERVICE), help="the service binary")
    parser.add_argument("--store", choices=["memory", "redis"], default="memory")
    parser.add_argument("--measure", choices=["time", "instructions"], default="time")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each kind, with --measure time")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per round, with --measure time")
    parser.add_argument("--calls", type=int, default=10_000, help="calls counted, with --measure instructions")
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--keys", type=int, default=10_000)
    args = parser.parse_args()
    args.profile = "service"
    for name in ("rounds", "calls", "in_flight", "connections", "keys"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} is {getattr(args, name)}; it must be at least 1")
    if not 0.1 <= args.seconds <= 3600:
        parser.error(f"--seconds is {args.seconds}; it must be from 0.1 to 3600")
    for binary in (args.binary, str(matrix.LOADGEN)):
        if not os.access(binary, os.X_OK):
            parser.error(f"{binary} is not an executable file; build it first with cargo build --release --bins")

    variants = {"configured": None, UNCONFIGURED: UNCONFIGURED}
    rows = {name: [] for name in variants}
    rounds, out_dir = compare.plan_rounds(args)
    for round_index in range(rounds):
        for name, domain in variants.items():
            row = compare.measure_round(args.binary, args, round_index, out_dir, domain)
            if args.measure == "time" and row["cpu_us"] is None:
                sys.exit(f"round {round_index + 1} ({name}) measured no calls; run it with more --seconds")
            if row.get("errors"):
                sys.exit(f"round {round_index + 1} ({name}) had {row['errors']} failed calls; run the service and "
                         f"fikra-loadgen by hand with the same options to see their errors")
            rows[name].append(row)
            print(f"round {round_index + 1} {name}: " + ", ".join(f"{k} {v:,.2f}" for k, v in row.items()),
                  flush=True)

    measure = "cpu_us" if args.measure == "time" else "instructions"
    full = [row[measure] for row in rows["configured"]]
    floor = [row[measure] for row in rows[UNCONFIGURED]]
    print(f"\n{args.store}, {args.connections} connections, {args.in_flight} in flight, {args.keys} keys; "
          f"{measure} per decision, median (range) of {rounds} round(s)")
    print(f"configured domain:   {compare.summary(full)}")
    print(f"unconfigured domain: {compare.summary(floor)}")
    print(f"floor share: {statistics.median(floor) / statistics.median(full):.3f}; "
          f"the decision's own cost: {statistics.median(full) - statistics.median(floor):,.2f}")


if __name__ == "__main__":
    main()
