#!/usr/bin/env python3
"""The edge benchmark of issue 18: AccelGate on gRPC's C core against an inline peer.

Both servers are driven by the same C-core load generator (Benchmarks/loadgen),
one channel, identical payloads:

* the inline peer (Benchmarks/peer): a libgrpc++ sync server running each job
  inline with the device's own engine functions;
* AccelGate (`accelgate serve`, embedded device, shipped defaults).

Each row runs A/B alternately, ROUNDS times SECONDS each, and reports the
median calls/s and p99 with their spread (min–max), and each server's CPU per
call (utime+stime from /proc over the run). A first row drives the peer's
--no-work mode: the load generator's own ceiling, which must be at least 1.3x
the fastest row it drives.

    scripts/bench_edge.py OUT.json [--rounds 5] [--seconds 10]

Writes OUT.json, and the Markdown table between the edge-table markers of
docs/BENCHMARKS.md.
"""
import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADGEN = os.path.join(ROOT, "Benchmarks/loadgen/build/accelgate-load")
PEER = os.path.join(ROOT, "Benchmarks/peer/build/accelgate-peer")
ACCELGATE = os.path.join(ROOT, ".build/release/accelgate")
DOC = os.path.join(ROOT, "docs/BENCHMARKS.md")
BEGIN, END = "<!-- edge-table:begin -->", "<!-- edge-table:end -->"

# (job, size, callers): the table of issue 18.
ROWS = [
    ("sha256", 4096, 16), ("aes256gcm", 4096, 16), ("gzip1", 4096, 16), ("gzip1", 65536, 16),
    ("gzip1", 1 << 20, 1), ("gzip1", 1 << 20, 16), ("aes256gcm", 1 << 20, 16),
]
LABEL = {"sha256": "SHA-256", "aes256gcm": "AES-256-GCM", "gzip1": "gzip-1"}


def size_name(n):
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


class Server:
    def __init__(self, name, argv, pattern):
        self.name = name
        self.log = open(os.path.join(ROOT, ".build-bench", f"edge-{name}.log"), "wb")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, cwd=ROOT)
        deadline = time.monotonic() + 60
        self.port = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.search(pattern, line)
            if m:
                self.port = int(m.group(1))
                break
        if self.port is None:
            raise SystemExit(f"{name} did not start (see .build-bench/edge-{name}.log)")

    def cpu_seconds(self):
        fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def drive(server, job, size, callers, seconds):
    cpu0 = server.cpu_seconds()
    out = subprocess.run(
        [LOADGEN, "--target", f"127.0.0.1:{server.port}", "--job", job, "--size", str(size), "--callers",
         str(callers), "--seconds", str(seconds), "--warmup", "1"], capture_output=True, text=True)
    cpu = server.cpu_seconds() - cpu0
    if out.returncode != 0 and not out.stdout.strip():
        raise SystemExit(f"load generator failed against {server.name}: {out.stderr}")
    r = json.loads(out.stdout)
    # The server's CPU covers the warm-up second too: per call, over every call it answered.
    answered = max(1, r["calls"] * (seconds + 1) / seconds)
    r["server_cpu_us_per_call"] = cpu * 1e6 / answered
    return r


def summary(runs, key):
    values = [r[key] for r in runs]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_EDGE_ROUNDS", 5)))
    p.add_argument("--seconds", type=float, default=float(os.environ.get("BENCH_EDGE_SECONDS", 10)))
    a = p.parse_args()
    os.makedirs(os.path.join(ROOT, ".build-bench"), exist_ok=True)
    peer = Server("peer", [PEER, "--port", "0"], rb"peer listening on 127\.0\.0\.1:(\d+)")
    nowork = Server("peer-no-work", [PEER, "--port", "0", "--no-work"], rb"peer listening on 127\.0\.0\.1:(\d+)")
    gateway = Server("accelgate", [ACCELGATE, "serve", "--port", "0", "--no-metrics", "--log-level", "warning"],
                     rb"accelgate listening on 127\.0\.0\.1:(\d+)")
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                                        if l.startswith("model name")), "?")},
               "rounds": a.rounds, "seconds": a.seconds, "rows": []}
    try:
        # The generator's ceiling: the fastest row's shape against a server that does no work.
        ceiling = [drive(nowork, "sha256", 4096, 16, a.seconds) for _ in range(a.rounds)]
        results["loadgen_ceiling"] = {"calls_per_s": summary(ceiling, "calls_per_s"),
                                      "loadgen_cpu_us_per_call": summary(ceiling, "loadgen_cpu_us_per_call")}
        total = len(ROWS) * a.rounds
        done = 0
        for job, size, callers in ROWS:
            runs = {"peer": [], "accelgate": []}
            for _ in range(a.rounds):
                for name, server in [("peer", peer), ("accelgate", gateway)]:
                    runs[name].append(drive(server, job, size, callers, a.seconds))
                done += 1
                bar = "#" * (30 * done // total)
                print(f"\r[{bar:<30}] {done}/{total} {LABEL[job]} {size_name(size)} x{callers}   ", end="",
                      file=sys.stderr, flush=True)
            row = {"job": job, "size": size, "callers": callers, "servers": {}}
            for name, rs in runs.items():
                row["servers"][name] = {k: summary(rs, k) for k in
                                        ("calls_per_s", "p99_ms", "server_cpu_us_per_call", "loadgen_cpu_us_per_call")}
                row["servers"][name]["errors"] = sum(r["errors"] for r in rs)
            results["rows"].append(row)
        print(file=sys.stderr)
    finally:
        for s in [peer, nowork, gateway]:
            s.stop()
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
    table = markdown(results)
    print(table)
    if os.path.exists(DOC):
        doc = open(DOC).read()
        if BEGIN in doc and END in doc:
            head, rest = doc.split(BEGIN, 1)
            doc = head + BEGIN + "\n" + table + END + rest.split(END, 1)[1]
            open(DOC, "w").write(doc)


def markdown(results):
    def fmt(s, digits=0):
        m, lo, hi = s["median"], s["min"], s["max"]
        return f"{m:,.{digits}f} ({lo:,.{digits}f}–{hi:,.{digits}f})"

    lines = []
    c = results["loadgen_ceiling"]
    fastest = max(r["servers"]["peer"]["calls_per_s"]["median"] for r in results["rows"])
    fastest = max(fastest, max(r["servers"]["accelgate"]["calls_per_s"]["median"] for r in results["rows"]))
    lines.append(f"Machine: {results['machine']['cpus']} CPUs, {results['machine']['cpu']}; "
                 f"{results['rounds']} alternating rounds of {results['seconds']:g} s per row; median (min–max).")
    lines.append("")
    lines.append(f"Load generator ceiling (SHA-256 4 KiB x16 against the peer's --no-work): "
                 f"{fmt(c['calls_per_s'])} calls/s, {c['loadgen_cpu_us_per_call']['median']:.1f} µs of its own CPU "
                 f"per call; {c['calls_per_s']['median'] / fastest:.2f}x the fastest row ({fastest:,.0f}).")
    lines.append("")
    lines.append("| job | callers | peer calls/s | AccelGate calls/s | ratio | peer p99 ms | "
                 "AccelGate p99 ms | peer CPU µs/call | AccelGate CPU µs/call |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["rows"]:
        peer, ag = r["servers"]["peer"], r["servers"]["accelgate"]
        ratio = ag["calls_per_s"]["median"] / max(peer["calls_per_s"]["median"], 1e-9)
        lines.append(
            f"| {LABEL[r['job']]} {size_name(r['size'])} | {r['callers']} | {fmt(peer['calls_per_s'])} | "
            f"{fmt(ag['calls_per_s'])} | {ratio:.2f} | {fmt(peer['p99_ms'], 1)} | {fmt(ag['p99_ms'], 1)} | "
            f"{peer['server_cpu_us_per_call']['median']:.0f} | {ag['server_cpu_us_per_call']['median']:.0f} |")
    lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
