#!/usr/bin/env python3
"""Syscalls per job on the doorbell hot path, counted by strace -f -c.

For each doorbell mode, runs `accelbench doorbell` twice under strace: once
with no jobs and once with N jobs, in one process each (driver loop, engine and
everything else). The difference, divided by N, is what the jobs cost: set-up,
teardown and the idle park are in both runs and cancel out.

Usage: count_syscalls.py BENCH_BINARY OUT_JSON [JOBS]
"""
import json
import os
import subprocess
import sys
import tempfile


def strace_counts(cmd):
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as f:
        subprocess.run(["strace", "-f", "-c", "-o", f.name] + cmd, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        counts = {}
        for line in f.read().splitlines():
            parts = line.split()
            # % time, seconds, usecs/call, calls, [errors], syscall
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                try:
                    counts[parts[-1]] = int(parts[3])
                except ValueError:
                    pass
        return counts


def main(binary, out, jobs):
    rows = []
    for mode in ("adaptive", "eventfd-per-job"):
        base = [binary, "doorbell", "--only", mode, "--opcode", "nop", "--skip-idle", "--json", os.devnull]
        empty = strace_counts(base + ["--jobs", "0"])
        loaded = strace_counts(base + ["--jobs", str(jobs)])
        delta = {k: loaded.get(k, 0) - empty.get(k, 0) for k in set(loaded) | set(empty)}
        delta = {k: v for k, v in delta.items() if v > 0}
        total = sum(delta.values())
        top = sorted(delta.items(), key=lambda kv: -kv[1])[:4]
        rows.append({"mode": mode, "jobs": jobs, "syscalls": total, "perJob": total / jobs,
                     "top": [{"syscall": k, "calls": v} for k, v in top]})
        print(f"{mode:16} {total:8d} syscalls for {jobs} jobs = {total / jobs:.4f} per job  "
              + ", ".join(f"{k} {v}" for k, v in top))
    with open(out, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 200_000)
