#!/usr/bin/env python3
"""Benchmark matrix for fikra-ratelimit.

Starts its own redis-server processes (standalone and a 3-primary cluster)
on free loopback ports, runs the release service against each store and
drives it with fikra-loadgen over a matrix of in-flight counts, connection
counts and key spreads. Each cell runs several times; the tables give the
median with the range. The same run measures the ceiling of the bucket
script itself with redis-benchmark on the same Redis, so every figure can be
read as a ratio of it.

Usage: bench/matrix.py [--runs 3] [--seconds 3] [--stores memory,redis,redis-cache,cluster]
Build first: cargo build --release --bins
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "target/release/fikra-ratelimit"
LOADGEN = ROOT / "target/release/fikra-loadgen"
CONFIG = ROOT / "deploy/config/fikra.yaml"
# Seconds of unmeasured load before each measured run.
WARMUP_SECONDS = 0.5


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port, seconds=10.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


class Processes:
    """Child processes, stopped by PID in reverse start order."""

    def __init__(self):
        self.children = []
        self.dirs = []

    def start(self, args, **kwargs):
        child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
        self.children.append(child)
        return child

    def tempdir(self):
        path = tempfile.mkdtemp(prefix="fikra-bench-")
        self.dirs.append(path)
        return path

    def stop(self, child):
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        self.children.remove(child)

    def stop_all(self):
        for child in reversed(list(self.children)):
            self.stop(child)
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)


def redis_server(procs, port, *extra):
    directory = procs.tempdir()
    procs.start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", directory, *extra])
    wait_port(port)


def standalone(procs):
    port = free_port()
    redis_server(procs, port)
    return f"redis://127.0.0.1:{port}", [port]


def cluster_port():
    """Return a free port whose cluster bus port (the port plus 10,000) is valid."""
    while True:
        port = free_port()
        if port + 10_000 <= 65_535:
            return port


def cluster(procs):
    ports = [cluster_port() for _ in range(3)]
    for port in ports:
        redis_server(procs, port, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000")
    nodes = [f"127.0.0.1:{port}" for port in ports]
    subprocess.run(["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        info = subprocess.run(["redis-cli", "-p", str(ports[0]), "CLUSTER", "INFO"], capture_output=True, text=True).stdout
        if "cluster_state:ok" in info:
            break
        time.sleep(0.1)
    url = f"redis-cluster://{nodes[0]}?" + "&".join(f"node={node}" for node in nodes[1:])
    return url, ports


def service(procs, redis_url, extra_args=()):
    port = free_port()
    args = [str(SERVICE), "serve", "--config", str(CONFIG), "--listen", f"127.0.0.1:{port}",
            "--metrics-listen", "127.0.0.1:0", *extra_args]
    if redis_url:
        args += ["--redis-url", redis_url]
    env = dict(os.environ, RUST_LOG="warn")
    child = procs.start(args, env=env)
    wait_port(port)
    time.sleep(0.5)
    return child, port


def loadgen(port, pid, in_flight, connections, keys, seconds, prefix, rate=None, domain=None):
    args = [str(LOADGEN), "--target", f"http://127.0.0.1:{port}", "--in-flight", str(in_flight),
            "--connections", str(connections), "--keys", str(keys), "--duration", str(seconds),
            "--warmup", str(WARMUP_SECONDS), "--service-pid", str(pid), "--key-prefix", prefix]
    if rate:
        args += ["--rate", str(rate)]
    if domain:
        args += ["--domain", domain]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"fikra-loadgen failed (exit {result.returncode}): {result.stderr.strip()}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def script_calls(ports):
    """EVALSHA and EVAL calls served so far by the Redis servers on `ports`."""
    total = 0
    for port in ports:
        info = subprocess.run(["redis-cli", "-p", str(port), "INFO", "commandstats"],
                              capture_output=True, text=True, check=True).stdout
        for line in info.splitlines():
            if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
                total += int(line.split("calls=")[1].split(",")[0])
    return total


def script_ceiling(port, clients, pipeline, requests):
    """Calls/s of the bucket script by EVALSHA, one requests bucket per call."""
    script = (ROOT / "src/store/bucket.lua").read_text()
    sha = subprocess.run(["redis-cli", "-p", str(port), "SCRIPT", "LOAD", script],
                         capture_output=True, text=True, check=True).stdout.strip()
    # Judge mode, one operation: a 30-per-minute bucket charged 1.
    args = ["redis-benchmark", "-p", str(port), "-c", str(clients), "-n", str(requests), "-P", str(pipeline),
            "-r", "10000", "--csv", "EVALSHA", sha, "1", "frl1:{bench__rand_int__}:b",
            "0", "1", "2000", "600000", "0", "30", "2000", "1", "1", "1", "0", "0", "0", "0", "x"]
    output = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    row = output.strip().splitlines()[-1].split(",")
    return float(row[1].strip('"'))


def median_range(values):
    return statistics.median(values), min(values), max(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--stores", default="memory,redis,cluster")
    parser.add_argument("--in-flight", default="16,64,256")
    parser.add_argument("--connections", default="1,4")
    parser.add_argument("--key-spreads", default="10000,1", help="distinct keys per cell; 1 is one hot key")
    parser.add_argument("--json", help="write every run here as JSON lines")
    options = parser.parse_args()

    # Each store: how to start it, and extra service arguments. The
    # `-cache` variants turn the local denial cache on.
    stores = {
        "memory": (lambda p: (None, []), []),
        "redis": (standalone, []),
        "redis-cache": (standalone, ["--deny-cache-ms", "1000"]),
        "cluster": (cluster, []),
    }
    procs = Processes()
    results = []
    half_peak = []
    try:
        for store in options.stores.split(","):
            start_store, extra_args = stores[store]
            redis_url, redis_ports = start_store(procs)
            child, port = service(procs, redis_url, extra_args)
            ceiling = None
            # The ceiling is measured on the standalone Redis: on the cluster
            # redis-benchmark's random keys would land on other nodes' slots.
            if store.startswith("redis"):
                ceiling = {
                    "unpipelined": script_ceiling(redis_ports[0], 50, 1, 200_000),
                    "pipelined_16": script_ceiling(redis_ports[0], 50, 16, 1_000_000),
                }
                print(f"# {store}: script ceiling {ceiling}", file=sys.stderr)
            for keys in map(int, options.key_spreads.split(",")):
                for connections in map(int, options.connections.split(",")):
                    for in_flight in map(int, options.in_flight.split(",")):
                        runs = []
                        for run in range(options.runs):
                            prefix = f"{store}-{keys}-{connections}-{in_flight}-{run}-{time.time_ns()}"
                            calls_before = script_calls(redis_ports)
                            result = loadgen(port, child.pid, in_flight, connections, keys, options.seconds, prefix)
                            # Calls during warm-up count too, so this slightly
                            # overstates the calls per decision.
                            result["script_calls"] = script_calls(redis_ports) - calls_before
                            runs.append(result)
                        cell = {"store": store, "keys": keys, "connections": connections, "in_flight": in_flight,
                                "runs": runs, "ceiling": ceiling}
                        results.append(cell)
                        throughput = median_range([r["throughput"] for r in runs])
                        print(f"# {store} keys={keys} conns={connections} in_flight={in_flight}: "
                              f"{throughput[0]:.0f}/s", file=sys.stderr)
            # Latency at half of the peak: 10,000 keys, 4 connections, 64 in
            # flight, paced at half the median throughput measured above.
            peak = [cell for cell in results if cell["store"] == store and cell["keys"] == 10_000
                    and cell["connections"] == 4 and cell["in_flight"] == 64]
            if peak:
                rate = statistics.median(r["throughput"] for r in peak[0]["runs"]) / 2
                runs = [loadgen(port, child.pid, 64, 4, 10_000, options.seconds,
                                f"{store}-half-{run}-{time.time_ns()}", rate=rate) for run in range(options.runs)]
                half_peak.append({"store": store, "rate": rate, "runs": runs})
            procs.stop(child)
    finally:
        procs.stop_all()

    if options.json:
        with open(options.json, "w") as out:
            for cell in results + half_peak:
                out.write(json.dumps(cell) + "\n")
    print_tables(results)
    print_half_peak(half_peak)


def print_half_peak(rows):
    if not rows:
        return
    print("\n### At half of the peak (10,000 keys, 4 connections, 64 in flight, paced)\n")
    print("| store | paced at /s | achieved /s | p50 µs | p99 µs | p99.9 µs | CPU µs/decision |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        runs = row["runs"]
        def med(name):
            return statistics.median(r[name] or 0.0 for r in runs)
        print(f"| {row['store']} | {row['rate']:.0f} | {med('throughput'):.0f} | {med('p50_us'):.0f} | "
              f"{med('p99_us'):.0f} | {med('p999_us'):.0f} | {med('service_cpu_us_per_decision'):.1f} |")


def print_tables(results):
    def fmt(triple, digits=0):
        med, low, high = triple
        return f"{med:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"

    for store in dict.fromkeys(cell["store"] for cell in results):
        cells = [cell for cell in results if cell["store"] == store]
        ceiling = cells[0]["ceiling"]
        print(f"\n### {store}\n")
        if ceiling:
            print(f"Script ceiling on the same Redis (redis-benchmark EVALSHA, 50 clients): "
                  f"{ceiling['unpipelined']:.0f}/s unpipelined, {ceiling['pipelined_16']:.0f}/s pipelined 16 deep.\n")
        print("| keys | conns | in flight | decisions/s | vs script | p50 µs | p99 µs | p99.9 µs | CPU µs/decision | "
              "script calls/decision | denied % | allowed (max of runs) | errors |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for cell in cells:
            runs = cell["runs"]
            throughput = median_range([r["throughput"] for r in runs])
            ratio = f"{throughput[0] / ceiling['unpipelined']:.2f}" if ceiling else "–"
            cpu = [r["service_cpu_us_per_decision"] or 0.0 for r in runs]
            denied = statistics.median([100.0 * r["denied"] / max(r["decisions"], 1) for r in runs])
            errors = sum(r["errors"] for r in runs)
            keys = "hot" if cell["keys"] == 1 else f"{cell['keys']:,}"
            calls = statistics.median(r.get("script_calls", 0) / max(r["decisions"], 1) for r in runs)
            calls = f"{calls:.3f}" if cell["store"] != "memory" else "–"
            print(f"| {keys} | {cell['connections']} | {cell['in_flight']} | {fmt(throughput)} | {ratio} | "
                  f"{fmt(median_range([r['p50_us'] for r in runs]))} | {fmt(median_range([r['p99_us'] for r in runs]))} | "
                  f"{fmt(median_range([r['p999_us'] for r in runs]))} | {fmt(median_range(cpu), 1)} | {calls} | "
                  f"{denied:.0f} | {max(r['allowed'] for r in runs):,} | {errors} |")


if __name__ == "__main__":
    main()
