#!/usr/bin/env python3
"""Compares service builds on one benchmark cell, in one run.

Shared machines can drift by tens of percent within minutes, so two
builds measured at different times cannot be compared. This script runs the
builds alternately, each round with its own fresh redis-server (when the
store is Redis), and reports each build's median and range next to the
first build's, as a ratio.

Two measures:
- time (default): fikra-loadgen's service CPU per decision and throughput,
  and, on Redis, the script time per check that Redis itself reports
  (INFO commandstats).
- instructions: the service, or with --profile redis the redis-server,
  runs under callgrind, and the count of instructions per decision is
  taken over a fixed number of calls after a warm-up. It does not drift
  with the machine's load, so it shows small changes that timing cannot.

Usage:
  bench/compare.py [--store memory|redis] [--measure time|instructions]
                   [--profile service|redis] [--rounds 5] [--seconds 4]
                   [--calls 10000] OLD_BINARY NEW_BINARY [...]
Build each binary first, for example with a worktree of the old commit:
  git worktree add ../old REV && cargo build --release --manifest-path ../old/Cargo.toml
"""

import argparse
import glob
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import matrix  # noqa: E402


def script_stats(port):
    """Returns the EVALSHA calls and the microseconds Redis spent in them."""
    info = subprocess.run(["redis-cli", "-p", str(port), "INFO", "commandstats"],
                          capture_output=True, text=True, check=True).stdout
    for line in info.splitlines():
        if line.startswith("cmdstat_evalsha:"):
            fields = dict(part.split("=") for part in line.split(":", 1)[1].split(","))
            return int(fields["calls"]), int(fields["usec"])
    return 0, 0


def timed_round(binary, args, round_index, domain=None):
    procs = matrix.Processes()
    try:
        url, ports = matrix.standalone(procs) if args.store == "redis" else (None, [])
        matrix.SERVICE = Path(binary)
        child, port = matrix.service(procs, url)
        before = script_stats(ports[0]) if ports else (0, 0)
        result = matrix.loadgen(port, child.pid, args.in_flight, args.connections, args.keys, args.seconds,
                                f"c{round_index}", domain=domain)
        row = {"cpu_us": result["service_cpu_us_per_decision"], "throughput": result["throughput"],
               "errors": result["errors"]}
        if ports:
            calls, usec = script_stats(ports[0])
            # The load generator's warm-up checks reach Redis too, at the same rate.
            checks = result["decisions"] * (args.seconds + matrix.WARMUP_SECONDS) / args.seconds
            row["script_us"] = (usec - before[1]) / checks
        return row
    finally:
        procs.stop_all()


def callgrind_total(path):
    for line in open(path):
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"callgrind wrote no instruction total to {path}; check that valgrind runs here")


def counted_round(binary, args, out_dir, domain=None):
    """Counts the instructions per decision of the service or of redis-server."""
    procs = matrix.Processes()
    try:
        out = os.path.join(out_dir, f"callgrind.{Path(binary).name}.{args.profile}.{domain or 'configured'}")
        for old in glob.glob(out + "*"):
            os.remove(old)
        valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        url = None
        if args.store == "redis":
            redis_port = matrix.free_port()
            command = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                       "--appendonly", "no", "--dir", procs.tempdir()]
            redis = procs.start(valgrind + command if args.profile == "redis" else command)
            matrix.wait_port(redis_port, 120)
            url = f"redis://127.0.0.1:{redis_port}"
        port = matrix.free_port()
        command = [binary, "serve", "--config", str(matrix.CONFIG), "--listen", f"127.0.0.1:{port}",
                   "--metrics-listen", "127.0.0.1:0"]
        if url:
            command += ["--redis-url", url]
        service = procs.start(valgrind + command if args.profile == "service" else command,
                              env=dict(os.environ, RUST_LOG="warn"))
        matrix.wait_port(port, 120)
        profiled = service if args.profile == "service" else redis
        load = [str(matrix.LOADGEN), "--target", f"http://127.0.0.1:{port}", "--in-flight", str(args.in_flight),
                "--connections", str(args.connections), "--keys", str(args.keys)]
        if domain:
            load += ["--domain", domain]
        subprocess.run(load + ["--count", "1000", "--key-prefix", "warm"], capture_output=True, check=True)
        subprocess.run(["callgrind_control", "--zero", str(profiled.pid)], capture_output=True, check=True)
        subprocess.run(load + ["--count", str(args.calls), "--key-prefix", "counted"], capture_output=True, check=True)
        subprocess.run(["callgrind_control", "--dump", str(profiled.pid)], capture_output=True, check=True)
        time.sleep(1)
        dumps = sorted(glob.glob(out + ".*"), key=os.path.getmtime)
        return {"instructions": callgrind_total(dumps[-1]) / args.calls}
    finally:
        procs.stop_all()


def plan_rounds(args):
    """Returns the number of rounds and, for callgrind, the directory of its profiles."""
    if args.measure == "time":
        return args.rounds, None
    out_dir = matrix.Processes().tempdir()
    print(f"callgrind profiles go to {out_dir}", flush=True)
    return 1, out_dir


def measure_round(binary, args, round_index, out_dir, domain=None):
    """Measures one round of `binary` by the measure `args.measure` selects, with checks for `domain`."""
    if args.measure == "time":
        return timed_round(binary, args, round_index, domain)
    return counted_round(binary, args, out_dir, domain)


def summary(values):
    median, low, high = matrix.median_range(values)
    return f"{median:,.2f} ({low:,.2f} to {high:,.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binaries", nargs="+", help="service binaries; the first is the baseline")
    parser.add_argument("--store", choices=["memory", "redis"], default="redis")
    parser.add_argument("--measure", choices=["time", "instructions"], default="time")
    parser.add_argument("--profile", choices=["service", "redis"], default="service",
                        help="the process callgrind counts, with --measure instructions")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--calls", type=int, default=10_000, help="calls counted with --measure instructions")
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--keys", type=int, default=10_000)
    args = parser.parse_args()
    if args.profile == "redis" and args.store != "redis":
        parser.error("--profile redis needs --store redis")
    for binary in args.binaries:
        if not os.access(binary, os.X_OK):
            parser.error(f"{binary} is not an executable file; build it first")

    rows = {binary: [] for binary in args.binaries}
    rounds, out_dir = plan_rounds(args)
    for round_index in range(rounds):
        for binary in args.binaries:
            row = measure_round(binary, args, round_index, out_dir)
            rows[binary].append(row)
            print(f"round {round_index + 1} {binary}: " + ", ".join(f"{k} {v:,.2f}" for k, v in row.items()),
                  flush=True)

    print(f"\n{args.store}, {args.connections} connections, {args.in_flight} in flight, {args.keys} keys; "
          f"median (range) of {rounds} round(s)")
    base = rows[args.binaries[0]]
    for binary in args.binaries:
        parts = []
        for name in rows[binary][0]:
            values = [row[name] for row in rows[binary]]
            ratio = statistics.median(values) / statistics.median(row[name] for row in base) if name != "errors" else None
            parts.append(f"{name} {summary(values)}" + (f" x{ratio:.3f}" if ratio else ""))
        print(f"{binary}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
