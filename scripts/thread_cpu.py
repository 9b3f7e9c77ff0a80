#!/usr/bin/env python3
"""CPU per call of each gateway thread under load (issue 18, part 5).

Starts a release `accelgate serve` (shipped defaults plus any extra server
arguments), drives it with the C-core load generator, and reads each thread's
utime+stime and context switches from /proc/PID/task/*/ at the start and end of
the measured window. Threads are named (`grpc-cq-0`, `accel-reaper`,
`accel-engine-N`, ...), so the table says which hop costs what.

  scripts/thread_cpu.py --job sha256 --size 4096 --callers 16 --seconds 6 [-- --engines 1]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_edge import ACCELGATE, LOADGEN, ROOT, Server  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def snapshot(pid):
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                status = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        switches = [int(m) for m in re.findall(r"^(?:non)?voluntary_ctxt_switches:\s+(\d+)", status, re.M)]
        threads[tid] = (name, int(fields[11]), int(fields[12]), switches[0], switches[1])
    return threads


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--job", default="sha256", choices=["sha256", "aes256gcm", "gzip1"])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--callers", type=int, default=16)
    p.add_argument("--seconds", type=float, default=6)
    p.add_argument("--binary", default=ACCELGATE)
    p.add_argument("server_args", nargs="*")
    a = p.parse_args()
    os.makedirs(os.path.join(ROOT, ".build-bench"), exist_ok=True)
    server = Server("thread-cpu", [a.binary, "serve", "--port", "0", "--no-metrics", "--log-level", "warning",
                                   *a.server_args], rb"accelgate listening on 127\.0\.0\.1:(\d+)")
    try:
        warmup = 1.0
        load = subprocess.Popen(
            [LOADGEN, "--target", f"127.0.0.1:{server.port}", "--job", a.job, "--size", str(a.size),
             "--callers", str(a.callers), "--seconds", str(a.seconds), "--warmup", str(warmup)],
            stdout=subprocess.PIPE, text=True)
        time.sleep(warmup + 0.2)
        before, t0 = snapshot(server.proc.pid), time.monotonic()
        time.sleep(a.seconds - 0.5)
        after, t1 = snapshot(server.proc.pid), time.monotonic()
        result = json.loads(load.communicate()[0])
    finally:
        server.stop()
    calls = result["calls_per_s"] * (t1 - t0)
    rows, total = [], 0.0
    for tid, (name, u, s, vcs, ncs) in after.items():
        if tid not in before:
            continue
        _, u0, s0, vcs0, ncs0 = before[tid]
        cpu = (u - u0 + s - s0) / TICK
        total += cpu
        if cpu > 0:
            rows.append((cpu, name, (u - u0) / TICK, (s - s0) / TICK, vcs - vcs0 + ncs - ncs0))
    print(f"{a.job} {a.size} B x{a.callers}: {result['calls_per_s']:.0f} calls/s, p99 {result['p99_ms']:.2f} ms")
    print("| thread | µs per call | user | system | context switches per call |")
    print("|---|---:|---:|---:|---:|")
    for cpu, name, u, s, cs in sorted(rows, reverse=True):
        print(f"| `{name}` | {cpu * 1e6 / calls:.1f} | {u * 1e6 / calls:.1f} | {s * 1e6 / calls:.1f} | {cs / calls:.2f} |")
    print(f"| total | {total * 1e6 / calls:.1f} | | | |")
    print(f"load generator: {result['loadgen_cpu_us_per_call']:.1f} µs of its own CPU per call")


if __name__ == "__main__":
    main()
