#!/usr/bin/env python3
"""Streaming benchmarks for make bench (issue 7), all through the real binaries:

1. Gateway peak RSS (VmHWM) for one stream of 16 MiB, 256 MiB (gzip and zstd) and
   1 GiB (zstd), compress then decompress, each on a fresh gateway: memory must
   stay flat.
2. Interleaving on a device capped at 50 MB/s (one engine): a 4 KiB tenant's
   latency alone and while a streamer and a bulk tenant load the device, and each
   tenant's share of device time (from the gateway's own Prometheus counters).

Usage: bench_streams.py OUT_JSON
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATE = os.path.join(ROOT, ".build", "release", "accelgate")
CTL = os.path.join(ROOT, ".build", "release", "accelctl")
PORT = int(os.environ.get("BENCH_PORT", "50071"))


def start(*flags):
    log = tempfile.NamedTemporaryFile(prefix="agstream-", suffix=".log", delete=False)
    p = subprocess.Popen([GATE, "serve", "--port", str(PORT), "--metrics-port", "0", "--log-level", "warning", *flags],
                         stdout=log, stderr=subprocess.STDOUT)
    for _ in range(200):
        text = open(log.name).read()
        m = re.search(r"metrics on http://127.0.0.1:(\d+)/metrics", text)
        if "listening" in text and m:
            return p, int(m.group(1))
        time.sleep(0.05)
    raise SystemExit(f"gateway did not start:\n{open(log.name).read()}")


def stop(p):
    p.terminate()
    p.wait(30)


def vmhwm_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def make_file(path, size):
    chunk = b"".join(b"%d GET /objects/%d 200 %dms\n" % (i, i * 7919 % 100003, i % 97) for i in range(40000))
    rnd = os.urandom(1 << 20)
    with open(path, "wb") as f:
        written = 0
        while written < size:
            piece = (chunk + rnd)[: size - written]
            f.write(piece)
            written += len(piece)


RETRIES = []


def ctl(*args, key=None):
    extra = ["--api-key", key] if key else []
    for attempt in (1, 2):
        r = subprocess.run([CTL, args[0], "-t", f"127.0.0.1:{PORT}", *extra, *args[1:]], capture_output=True)
        if r.returncode == 0:
            return r
        err = r.stderr.decode(errors="replace")[-800:]
        # Known issue (issue 7): a large accelctl stream occasionally ends early with a
        # client-side "Stream unexpectedly closed"; it is retried once and reported.
        if attempt == 1 and "unexpectedly closed" in err:
            RETRIES.append(" ".join(args[:3]))
            print(f"retrying once after: {err.strip()}")
            continue
        raise SystemExit(f"accelctl {' '.join(args)} failed: {err}")


def rss_rows(work):
    rows = []
    for mib in (16, 256, 1024):
        src = os.path.join(work, f"in-{mib}.bin")
        make_file(src, mib << 20)
        for fmt in ("gzip", "zstd") if mib < 1024 else ("zstd",):
            p, _ = start("--engines", "2")
            base = vmhwm_kib(p.pid)
            t0 = time.monotonic()
            ctl("compress", "--format", fmt, "--stream", "-i", src, "-o", src + "." + fmt)
            tc = time.monotonic() - t0
            after_c = vmhwm_kib(p.pid)
            t0 = time.monotonic()
            ctl("decompress", "--format", fmt, "-i", src + "." + fmt, "-o", src + ".back")
            td = time.monotonic() - t0
            after_d = vmhwm_kib(p.pid)
            stop(p)
            same = open(src, "rb").read() == open(src + ".back", "rb").read()
            rows.append({"streamMiB": mib, "format": fmt, "startRSSMiB": base / 1024, "peakAfterCompressMiB": after_c / 1024,
                         "peakAfterDecompressMiB": after_d / 1024, "compressMBps": (mib << 20) / tc / 1e6,
                         "decompressMBps": (mib << 20) / td / 1e6, "roundTrip": same})
            print(f"{mib:4d} MiB {fmt:5s} RSS start {base/1024:6.1f} MiB, peak {after_c/1024:6.1f} / {after_d/1024:6.1f} MiB, "
                  f"compress {(mib<<20)/tc/1e6:6.1f} MB/s, decompress {(mib<<20)/td/1e6:6.1f} MB/s, round trip {same}")
            for f in (src + "." + fmt, src + ".back"):
                os.remove(f)
        os.remove(src)
    return rows


def scrape(mport):
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'accelgate_device_seconds_total\{tenant="([^"]+)"\} ([0-9.e+-]+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def interleave(work, seconds=8):
    import hashlib
    keys = {t: f"bench-{t}" for t in ("light", "streamer", "bulk")}
    tenants = os.path.join(work, "tenants.yaml")
    with open(tenants, "w") as f:
        f.write("tenants:\n")
        for t, k in keys.items():
            f.write(f"  - {{ id: {t}, weight: 1, api_key_sha256: [{hashlib.sha256(k.encode()).hexdigest()}] }}\n")
    src = os.path.join(work, "stream.bin")
    make_file(src, 512 << 20)
    p, mport = start("--engines", "1", "--engine-cap-mbps", "50", "--tenants", tenants)
    light_json = os.path.join(work, "light.json")

    def light(label):
        ctl("bench", "-c", "1", "--duration", str(seconds), "--sizes", "4K", "--mix", "compress:1", "--json", light_json,
            key=keys["light"])
        return json.load(open(light_json))["results"][0]["latencyMicroseconds"]

    solo = light("solo")
    before = scrape(mport)
    stream = threading.Thread(target=lambda: subprocess.run(
        [CTL, "compress", "-t", f"127.0.0.1:{PORT}", "--api-key", keys["streamer"], "--format", "gzip", "--level", "1",
         "--stream", "-i", src, "-o", os.devnull], capture_output=True, timeout=600))
    bulk = threading.Thread(target=lambda: ctl("bench", "-c", "8", "--duration", str(seconds), "--sizes", "1M",
                                               "--mix", "compress:1", "--level", "1", "--json", os.path.join(work, "bulk.json"),
                                               key=keys["bulk"]))
    stream.start()
    bulk.start()
    time.sleep(0.5)
    loaded = light("loaded")
    after = scrape(mport)
    bulk.join()
    stop(p)  # ends the stream too
    stream.join()
    os.remove(src)
    used = {t: after.get(t, 0) - before.get(t, 0) for t in keys}
    total = sum(used.values()) or 1
    shares = {t: used[t] / total for t in keys}
    print(f"light 4 KiB alone p50 {solo['p50']} us p99 {solo['p99']} us; with a stream and bulk p50 {loaded['p50']} us "
          f"p99 {loaded['p99']} us; device shares " + ", ".join(f"{t} {shares[t]*100:.1f}%" for t in keys))
    return {"lightSolo": solo, "lightLoaded": loaded, "deviceShare": shares, "seconds": seconds,
            "engineCapMBps": 50, "weights": {t: 1 for t in keys}}


def main(out):
    work = tempfile.mkdtemp(prefix="agstreams-")
    try:
        report = {"rss": rss_rows(work), "interleave": interleave(work)}
        report["retriedAfterStreamClosed"] = RETRIES
    finally:
        subprocess.run(["pkill", "-f", f"accelgate serve --port {PORT}"])
    with open(out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
