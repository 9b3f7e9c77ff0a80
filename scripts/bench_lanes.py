#!/usr/bin/env python3
"""Zero-copy lanes (issue 10) for make bench: 1 MiB AES-256-GCM and 1 MiB gzip
level 1 through every lane of one gateway, in one run:

- network lane over TCP, with pooled payloads off (the old copies) and on, when
  the gateway offers `--no-pooled-payloads`;
- the gateway's Unix socket with payloads in messages (same copies as TCP);
- the local lane: shared memory, no payload bytes on the socket.

Each row is `accelctl bench` (4 callers, closed loop). Usage: bench_lanes.py OUT_JSON
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATE = os.path.join(ROOT, ".build", "release", "accelgate")
CTL = os.path.join(ROOT, ".build", "release", "accelctl")
PORT = int(os.environ.get("BENCH_PORT", "50071"))
SECONDS = os.environ.get("BENCH_SECONDS", "3")
OPS = [("AES-256-GCM", "encrypt:1"), ("gzip-1", "compress:1")]


def start(work, *flags):
    sock = os.path.join(work, "ag.sock")
    log = open(os.path.join(work, "gateway.log"), "wb")
    p = subprocess.Popen([GATE, "serve", "--port", str(PORT), "--no-metrics", "--log-level", "warning",
                          "--local-socket", sock, *flags], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(200):
        if b"listening" in open(log.name, "rb").read() and os.path.exists(sock + ".ctl"):
            return p, sock
        time.sleep(0.05)
    raise SystemExit("gateway did not start:\n" + open(log.name).read())


def bench(target, mix, work, *extra):
    out = os.path.join(work, "row.json")
    subprocess.run([CTL, "bench", "-t", target, "-c", "4", "--duration", SECONDS, "--sizes", "1M", "--mix", mix,
                    "--level", "1", "--json", out, *extra], check=True, capture_output=True, timeout=300)
    r = json.load(open(out))["results"][0]
    return {"calls": r["calls"], "megabytesPerSecond": r["megabytesPerSecond"],
            "p50Microseconds": r["latencyMicroseconds"]["p50"], "p99Microseconds": r["latencyMicroseconds"]["p99"],
            "errors": r["errors"]}


def main(path):
    work = tempfile.mkdtemp(prefix="aglanes-")
    help_text = subprocess.run([GATE, "serve", "--help"], capture_output=True, text=True).stdout
    pooled = "pooled-payloads" in help_text
    configs = [("network (TCP), copies", ["--no-pooled-payloads"])] if pooled else []
    configs.append(("network (TCP)" + (", pooled payloads" if pooled else ""), []))
    rows = []
    for label, flags in configs:
        p, sock = start(work, *flags)
        try:
            for op, mix in OPS:
                rows.append(dict(bench(f"127.0.0.1:{PORT}", mix, work), lane=label, operation=op))
            if not flags:
                for op, mix in OPS:
                    rows.append(dict(bench(f"unix:{sock}", mix, work, "--no-shared-memory"), lane="Unix socket, payload in messages",
                                     operation=op))
                for op, mix in OPS:
                    rows.append(dict(bench(f"unix:{sock}", mix, work), lane="local lane (shared memory)", operation=op))
        finally:
            p.terminate()
            p.wait(30)
    best_net = {op: max(r["megabytesPerSecond"] for r in rows if r["operation"] == op and r["lane"].startswith("network"))
                for op, _ in OPS}
    local = {r["operation"]: r["megabytesPerSecond"] for r in rows if r["lane"].startswith("local")}
    ratio = {op: local[op] / best_net[op] for op, _ in OPS if best_net[op] > 0}
    for r in rows:
        print(f"{r['lane']:40s} {r['operation']:12s} {r['megabytesPerSecond']:8.1f} MB/s  p99 {r['p99Microseconds']/1000:.1f} ms")
    print("local lane / best network lane: " + ", ".join(f"{k} {v:.1f}x" for k, v in ratio.items()))
    json.dump({"rows": rows, "localOverNetwork": ratio, "pooledFlag": pooled, "callers": 4, "seconds": float(SECONDS)},
              open(path, "w"), indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
