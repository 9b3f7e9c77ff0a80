"""Renders make bench's JSON (in .build-bench/) into the generated sections of docs/BENCHMARKS.md."""
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    swift = subprocess.run(["swift", "--version"], capture_output=True, text=True).stdout.splitlines()
    return (f"{os.cpu_count()} cores, {cpu}, Linux {platform.release()}, "
            f"{swift[0] if swift else 'swift'}, release build")


def load(d, name):
    p = os.path.join(d, name)
    return json.load(open(p)) if os.path.exists(p) else None


def throughput_table(intro: str, results) -> str:
    rows = [intro, "", "| path | payload | callers | MB/s | ops/s | p50 µs | p99 µs |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        size = f"{r['payloadBytes'] // 1024} KiB" if r["payloadBytes"] < 1 << 20 else f"{r['payloadBytes'] >> 20} MiB"
        rows.append(f"| {r['layer']} | {size} | {r['concurrency']} | {r['megabytesPerSecond']:.1f} | "
                    f"{r['opsPerSecond']:.0f} | {r['p50Microseconds']:.0f} | {r['p99Microseconds']:.0f} |")
    return "\n".join(rows)


def compress_section(results) -> str:
    ratio = next((r.get("compressionRatio") for r in results if r.get("compressionRatio")), None)
    return throughput_table("Command: `make bench` (gzip level 1, log-like text"
                            + (f", ratio {ratio:.1f}:1" if ratio else "") + "; 3 s per row).", results)


def crypto_section(results) -> str:
    return throughput_table("Command: `make bench` (raw: the device's engine function on one thread; service: "
                            "gRPC Encrypt/Digest with 4 concurrent callers; 3 s per row).", results)


def mix_section(runs) -> str:
    out = ["Command: `make bench` → `accelctl bench -c 16 --mix compress:3,decompress:1,encrypt:1,decrypt:1,digest:1 "
           "--sizes 4K,64K,1M` against one gateway (embedded device, 2 engines), closed loop and then an open loop "
           "at 400 calls/s (latency measured from each call's scheduled start). Plots: "
           "[closed](bench-mix-closed.svg), [open](bench-mix-open.svg).", "",
           "| loop | operation | calls | ops/s | MB/s | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | errors |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label, run in runs:
        for r in run["results"]:
            l = r["latencyMicroseconds"]
            errs = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "-"
            out.append(f"| {label} | {r['operation']} | {r['calls']:,} | {r['opsPerSecond']:,.1f} | "
                       f"{r['megabytesPerSecond']:,.1f} | {l['p50']:,} | {l['p90']:,} | {l['p99']:,} | "
                       f"{l['p99.9']:,} | {l['max']:,} | {errs} |")
    return "\n".join(out)


def streams_section(r) -> str:
    out = ["Command: `make bench` → `scripts/bench_streams.py`. Peak RSS is the gateway's VmHWM on a fresh gateway "
           "after one `accelctl compress --stream` and one `accelctl decompress` of a log-like file with random "
           "stretches (1 MiB device jobs, 4 MiB gRPC chunks). The gateway tunes glibc malloc at start "
           "(`accel_tune_malloc`: 256 KiB mmap threshold, 2 arenas).", "",
           "| stream | format | RSS at start | peak after compress | peak after decompress | compress MB/s | decompress MB/s | round trip |",
           "|---:|---|---:|---:|---:|---:|---:|---|"]
    for x in r["rss"]:
        out.append(f"| {x['streamMiB']} MiB | {x['format']} | {x['startRSSMiB']:.1f} MiB | {x['peakAfterCompressMiB']:.1f} MiB | "
                   f"{x['peakAfterDecompressMiB']:.1f} MiB | {x['compressMBps']:.1f} | {x['decompressMBps']:.1f} | "
                   f"{'yes' if x['roundTrip'] else 'NO'} |")
    if r.get("retriedAfterStreamClosed"):
        out += ["", "Retried once after a client-side \"Stream unexpectedly closed\" (known issue, issue 7): "
                + ", ".join(f"`{x}`" for x in r["retriedAfterStreamClosed"]) + "."]
    i = r["interleave"]
    out += ["", f"Interleaving on one engine capped at {i['engineCapMBps']} MB/s, three tenants of weight 1: `light` "
            "(one 4 KiB compress at a time), `streamer` (a 512 MiB gzip-1 stream) and `bulk` (8 callers of 1 MiB "
            "jobs), over {0} s. Shares are of device time, from the gateway's `accelgate_device_seconds_total`.".format(i["seconds"]), "",
            "| light alone p50 / p99 | light under load p50 / p99 | streamer share | bulk share | light share |",
            "|---:|---:|---:|---:|---:|",
            f"| {i['lightSolo']['p50']/1000:.1f} / {i['lightSolo']['p99']/1000:.1f} ms | "
            f"{i['lightLoaded']['p50']/1000:.1f} / {i['lightLoaded']['p99']/1000:.1f} ms | "
            f"{i['deviceShare']['streamer']*100:.1f} % | {i['deviceShare']['bulk']*100:.1f} % | {i['deviceShare']['light']*100:.1f} % |"]
    return "\n".join(out)


def lanes_section(r) -> str:
    out = ["Command: `make bench` → `scripts/bench_lanes.py`: `accelctl bench -c 4 --sizes 1M` (closed loop, "
           f"{r['seconds']:.0f} s per row) against one gateway (embedded device, 2 engines) through each lane. "
           "The local lane registers a sealed memfd per caller and sends spans; the device reads and writes "
           "those pages in place.", "",
           "| lane | operation | calls | MB/s | p50 ms | p99 ms | errors |", "|---|---|---:|---:|---:|---:|---|"]
    for x in r["rows"]:
        errs = ", ".join(f"{k} {v}" for k, v in sorted(x["errors"].items())) or "-"
        out.append(f"| {x['lane']} | {x['operation']} | {x['calls']:,} | {x['megabytesPerSecond']:,.1f} | "
                   f"{x['p50Microseconds']/1000:.1f} | {x['p99Microseconds']/1000:.1f} | {errs} |")
    out += ["", "Local lane over the best network lane: " + ", ".join(
        f"**{k} {v:.1f}×**" for k, v in r["localOverNetwork"].items()) + " (target for AES-256-GCM: 3× or more)."]
    return "\n".join(out)


def syscalls_section(rows) -> str:
    out = ["", "Syscalls per job, counted by `strace -f -c` over the whole process (driver loop, engine and all): "
           "`scripts/count_syscalls.py` runs 200,000 NOP jobs and subtracts a run with none, so set-up and "
           "teardown cancel out. strace slows every syscall, so these runs are not timed.", "",
           "| doorbell | jobs | syscalls | syscalls / job | most frequent |", "|---|---:|---:|---:|---|"]
    for r in rows:
        top = ", ".join(f"{t['syscall']} {t['calls']:,}" for t in r["top"])
        out.append(f"| {r['mode']} | {r['jobs']:,} | {r['syscalls']:,} | {r['perJob']:.4f} | {top} |")
    return "\n".join(out)


def doorbell_section(rows) -> str:
    out = ["Command: `make bench` (one queue, one engine, 64 descriptors in flight, 16 per doorbell, the "
           "benchmark thread reaps the completion ring itself; wake syscalls and engine parks are counted by "
           "the driver and device; idle CPU is the process's CPU time over 1 s without work).", "",
           "| doorbell | job | descriptors/s | p50 µs | p99 µs | doorbell syscalls / job (driver count) | engine parks / job | idle CPU |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['mode']} | {r['opcode']} | {r['descriptorsPerSecond']:,.0f} | {r['p50Microseconds']:.1f} | "
                   f"{r['p99Microseconds']:.1f} | {r['wakeSyscallsPerJob']:.4f} | {r['engineParksPerJob']:.4f} | "
                   f"{r['idleCPUPercent']:.2f} % |")
    return "\n".join(out)


def fairness_section(runs) -> str:
    rows = ["Command: `make bench` (device capped at 50 MB/s per engine, 2 engines, 2 queues; "
            "tenants w1, w2, w4 each with 8 closed-loop gRPC callers of mixed 4 KiB–1 MiB gzip-1 jobs; "
            "shares of device time counted over the middle 9 s of 12 s).", "",
            "| scheduler | tenant | weight | jobs | device-time share | entitlement | relative error |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        for r in run["rows"]:
            rows.append(f"| {run['scheduler']} | {r['tenant']} | {r['weight']:.0f} | {r['jobs']} | "
                        f"{r['deviceShare'] * 100:.1f} % | {r['entitlement'] * 100:.1f} % | "
                        f"{r['relativeError'] * 100:+.1f} % |")
    rows += ["", "| scheduler | Jain index (weight-normalised) | worst relative error |", "|---|---:|---:|"]
    for run in runs:
        rows.append(f"| {run['scheduler']} | {run['jainIndex']:.4f} | {run['maxRelativeError'] * 100:.1f} % |")
    return "\n".join(rows)


def isolation_section(runs) -> str:
    rows = ["Light tenant: one 4 KiB job at a time. Flood: two heavy tenants, 12 callers each, 1 MiB jobs. "
            "Bound = solo p99 + one heavy job's device time (the non-preemptive bound).", "",
            "| scheduler | path | solo p50 | solo p99 | flood p50 | flood p99 | heavy job | bound | p99 within bound |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        name = r["scheduler"]
        path = "in-process" if "(rings)" in name else "gRPC"
        within = "yes" if r["floodP99Microseconds"] <= r["boundMicroseconds"] else (
            f"no (+{(r['floodP99Microseconds'] - r['boundMicroseconds']) / 1000:.1f} ms)")
        rows.append(f"| {name.replace(' (rings)', '')} | {path} | {r['soloP50Microseconds'] / 1000:.1f} ms | "
                    f"{r['soloP99Microseconds'] / 1000:.1f} ms | {r['floodP50Microseconds'] / 1000:.1f} ms | "
                    f"{r['floodP99Microseconds'] / 1000:.1f} ms | {r['heavyJobDeviceMicroseconds'] / 1000:.1f} ms | "
                    f"{r['boundMicroseconds'] / 1000:.1f} ms | {within} |")
    fair = {("rings" in r["scheduler"]): r for r in runs if r["scheduler"].startswith("fair")}
    fifo = {("rings" in r["scheduler"]): r for r in runs if r["scheduler"].startswith("fifo")}
    for key, label in ((False, "gRPC"), (True, "in-process")):
        if key in fair and key in fifo:
            ratio = fifo[key]["floodP99Microseconds"] / fair[key]["floodP99Microseconds"]
            rows.append(f"\nFair vs FIFO, light-tenant p99 under flood ({label}): **{ratio:.1f}× better**.")
    return "\n".join(rows)


def replace(text: str, name: str, body: str) -> str:
    begin = f"<!-- BEGIN {name} (generated by make bench) -->"
    end = f"<!-- END {name} -->"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + begin + "\n" + body + "\n" + end + tail


def main(d: str, doc: str) -> None:
    text = open(doc).read()
    stamp = f"Measured {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {machine()}."
    compress = load(d, "compress.json")
    if compress:
        text = replace(text, "compress-bench", stamp + "\n\n" + compress_section(compress))
    doorbell = load(d, "doorbell.json")
    if doorbell:
        extra = load(d, "doorbell-syscalls.json")
        text = replace(text, "doorbell-bench",
                       stamp + "\n\n" + doorbell_section(doorbell) + ("\n" + syscalls_section(extra) if extra else ""))
    mix = [(label, x) for label, x in (("closed", load(d, "mix-closed.json")), ("open 400/s", load(d, "mix-open.json"))) if x]
    if mix:
        text = replace(text, "mix-bench", stamp + "\n\n" + mix_section(mix))
    streams = load(d, "streams.json")
    if streams:
        text = replace(text, "streams-bench", stamp + "\n\n" + streams_section(streams))
    lanes = load(d, "lanes.json")
    if lanes:
        text = replace(text, "lanes-bench", stamp + "\n\n" + lanes_section(lanes))
    crypto = load(d, "crypto.json")
    if crypto:
        text = replace(text, "crypto-bench", stamp + "\n\n" + crypto_section(crypto))
    runs = [x for x in (load(d, "fairness-fair.json"), load(d, "fairness-fifo.json")) if x]
    if runs:
        text = replace(text, "fairness-bench", stamp + "\n\n" + fairness_section(runs))
    iso = [x for x in (load(d, f) for f in ("isolation-fair.json", "isolation-rings-fair.json",
                                            "isolation-fifo.json", "isolation-rings-fifo.json")) if x]
    if iso:
        text = replace(text, "isolation-bench", stamp + "\n\n" + isolation_section(iso))
    open(doc, "w").write(text)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
