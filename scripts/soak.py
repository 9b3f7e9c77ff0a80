#!/usr/bin/env python3
"""make soak: three tenants at saturation for SOAK_SECONDS (default 600), with a
fault injected every 30 s, every response verified (issue 17, Part 4).

Set-up: a standalone device daemon and one gateway attached to it with
--software-fallback, three tenants (weights 1, 2, 4) each running unary
Compress/Decompress/Encrypt/Decrypt/Digest, CompressStream and Submit streams
from several threads, as fast as the gateway answers.

Faults, in turn: kill -9 of the daemon (restarted 2 s later; the gateway serves
from its software fallback meanwhile and reattaches), a burst of device errors
(inject "error,every=3" for 5 s), and a stalled engine (inject "stall" for 3 s).

Every OK response is checked against Python's zlib, gzip, hashlib and
cryptography. Counted:
  lost        a call without a status by its deadline (DEADLINE_EXCEEDED on a
              30 s deadline, or a stream that never ended)
  wrong       OK with bytes that do not verify
  duplicated  a Submit job id answered twice
  statuses    every other status, by code; UNAVAILABLE and broken streams are
              statuses, not losses (a kill -9 causes them)
and the peak RSS (VmHWM) of the gateway and the daemon.

Writes .build-soak/soak.json and the table between the SOAK markers in
docs/BENCHMARKS.md.
"""
import collections
import gzip
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "interop"))
import gen_stubs  # noqa: E402

sys.path.insert(0, gen_stubs.generate())
import grpc  # noqa: E402
from accelgate.v1 import accelerator_pb2 as pb  # noqa: E402
from accelgate.v1 import accelerator_pb2_grpc as pb_grpc  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from daemonhelp import Control  # noqa: E402

BIN = os.environ.get("ACCELGATE_BIN") or os.path.join(ROOT, ".build", "release", "accelgate")
SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
FAULT_EVERY = float(os.environ.get("SOAK_FAULT_EVERY", "30"))
THREADS_PER_TENANT = int(os.environ.get("SOAK_THREADS", "4"))
DEADLINE = 30.0
OUT = os.path.join(ROOT, ".build-soak")
TENANTS = {"bronze": 1, "silver": 2, "gold": 4}


def words(n, seed):
    rng = random.Random(seed)
    vocab = [b"accel", b"gate", b"queue", b"ring", b"tenant", b"shared", b"memory", b"device", b"zstd", b"gzip"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(vocab) + (b" " if rng.random() < 0.9 else b"\n")
    return bytes(out[:n])


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.statuses = collections.Counter()
        self.examples = {}

    def add(self, key, example=None):
        with self.lock:
            self.counts[key] += 1
            if example and key not in self.examples:
                self.examples[key] = example

    def status(self, kind, code):
        with self.lock:
            self.statuses[f"{kind}:{code}"] += 1


def vmhwm_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Procs:
    def __init__(self, work):
        self.work = work
        self.sock = os.path.join(work, "dev.sock")
        self.daemon = None
        self.gateway = None
        self.peak = {"gateway": 0, "daemon": 0}
        self.logs = open(os.path.join(OUT, "soak.log"), "ab")

    def start_daemon(self):
        self.daemon = subprocess.Popen([BIN, "device", "--socket", self.sock, "--engines", "2"],
                                       stdout=self.logs, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        while not os.path.exists(self.sock) and time.monotonic() - t0 < 30:
            time.sleep(0.05)

    def start_gateway(self, tenants_file):
        self.gateway = subprocess.Popen(
            [BIN, "serve", "--port", "0", "--metrics-port", "0", "--device", f"unix://{self.sock}",
             "--software-fallback", "--tenants", tenants_file, "--queues", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        port = None
        for line in iter(self.gateway.stdout.readline, b""):
            self.logs.write(line)
            m = re.search(rb"accelgate listening on 127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        threading.Thread(target=lambda: [self.logs.write(l) for l in iter(self.gateway.stdout.readline, b"")],
                         daemon=True).start()
        return port

    def sample(self):
        for name in ("gateway", "daemon"):
            p = getattr(self, name)
            if p and p.poll() is None:
                self.peak[name] = max(self.peak[name], vmhwm_kib(p.pid))

    def stop(self):
        for p in (self.gateway, self.daemon):
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()


def inject(sock, fault):
    try:
        with Control(sock, timeout=5) as c:
            c.hello()
            c.ask({"op": "inject", "fault": fault})
        return True
    except Exception:  # the daemon may be down (killed); the fault is then moot
        return False


def classify(tally, kind, e):
    code = e.code().name if hasattr(e, "code") else "TRANSPORT"
    if code == "DEADLINE_EXCEEDED":
        tally.add("lost", f"{kind}: {e.details() if hasattr(e, 'details') else e}")
    tally.status(kind, code)


def unary_worker(stub, md, tally, stop, seed):
    rng = random.Random(seed)
    key = os.urandom(32)
    while not stop.is_set():
        data = words(rng.choice([1, 1000, 64 << 10, 512 << 10]), rng.random())
        op = rng.choice(["compress", "decompress", "encrypt", "decrypt", "digest"])
        try:
            if op == "compress":
                r = stub.Compress(pb.CompressRequest(format=pb.COMPRESSION_FORMAT_GZIP, level=rng.choice([1, 6]),
                                                     data=data), timeout=DEADLINE, metadata=md)
                ok = gzip.decompress(r.data) == data
            elif op == "decompress":
                blob = zlib.compress(data, 6)
                r = stub.Decompress(pb.DecompressRequest(format=pb.COMPRESSION_FORMAT_ZLIB, data=blob),
                                    timeout=DEADLINE, metadata=md)
                ok = r.data == data
            elif op == "encrypt":
                r = stub.Encrypt(pb.EncryptRequest(algorithm=pb.CIPHER_ALGORITHM_AES_256_GCM,
                                                   key=pb.KeySpec(raw=key), aad=b"soak", plaintext=data),
                                 timeout=DEADLINE, metadata=md)
                ok = AESGCM(key).decrypt(r.nonce, r.ciphertext, b"soak") == data
            elif op == "decrypt":
                nonce = os.urandom(12)
                ct = AESGCM(key).encrypt(nonce, data, b"soak")
                r = stub.Decrypt(pb.DecryptRequest(algorithm=pb.CIPHER_ALGORITHM_AES_256_GCM,
                                                   key=pb.KeySpec(raw=key), nonce=nonce, aad=b"soak", ciphertext=ct),
                                 timeout=DEADLINE, metadata=md)
                ok = r.plaintext == data
            else:
                r = stub.Digest(pb.DigestRequest(algorithm=pb.DIGEST_ALGORITHM_SHA256, data=data),
                                timeout=DEADLINE, metadata=md)
                ok = r.digest == hashlib.sha256(data).digest()
            tally.status(op, "OK")
            tally.add("ok" if ok else "wrong", None if ok else f"{op} of {len(data)} bytes")
        except grpc.RpcError as e:
            classify(tally, op, e)
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                time.sleep(0.05)


def stream_worker(stub, md, tally, stop, seed):
    rng = random.Random(seed)
    while not stop.is_set():
        data = words(rng.choice([256 << 10, 3 << 20]), rng.random())
        chunks = [data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)]

        def reqs():
            yield pb.CompressStreamRequest(format=pb.COMPRESSION_FORMAT_GZIP, level=1, data=chunks[0],
                                           final=len(chunks) == 1)
            for i, c in enumerate(chunks[1:], 1):
                yield pb.CompressStreamRequest(data=c, final=i == len(chunks) - 1)

        out = bytearray()
        try:
            for r in stub.CompressStream(reqs(), timeout=DEADLINE * 2, metadata=md):
                out += r.data
            ok = gzip.decompress(bytes(out)) == data
            tally.status("stream", "OK")
            tally.add("ok" if ok else "wrong", None if ok else f"stream of {len(data)} bytes")
        except grpc.RpcError as e:
            classify(tally, "stream", e)
            time.sleep(0.05)


def submit_worker(stub, md, tally, stop, seed):
    rng = random.Random(seed)
    while not stop.is_set():
        jobs = {}
        for i in range(32):
            data = words(rng.choice([100, 8 << 10, 128 << 10]), rng.random())
            jobs[f"{seed}-{time.monotonic_ns()}-{i}"] = data
        reqs = [pb.SubmitRequest(id=k, compress=pb.CompressRequest(format=pb.COMPRESSION_FORMAT_ZLIB, data=v))
                for k, v in jobs.items()]
        seen = set()
        try:
            for r in stub.Submit(iter(reqs), timeout=DEADLINE * 2, metadata=md):
                if r.id in seen:
                    tally.add("duplicated", r.id)
                    continue
                seen.add(r.id)
                if r.id not in jobs:
                    tally.add("wrong", f"submit answered unknown id {r.id}")
                    continue
                if r.code == 0:
                    ok = zlib.decompress(r.compress.data) == jobs[r.id]
                    tally.status("submit-job", "OK")
                    tally.add("ok" if ok else "wrong", None if ok else f"submit job {r.id}")
                else:
                    code = grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == r.code)).name
                    tally.status("submit-job", code)
                    if code == "DEADLINE_EXCEEDED":
                        tally.add("lost", f"submit job {r.id}")
            missing = set(jobs) - seen
            if missing:
                tally.add("lost", f"submit stream ended OK without {len(missing)} of its jobs")
                tally.counts["lost"] += len(missing) - 1
            tally.status("submit", "OK")
        except grpc.RpcError as e:
            classify(tally, "submit", e)
            time.sleep(0.05)


def faults(procs, stop, log):
    kinds = ["kill -9", "error burst", "stall"]
    n = 0
    while not stop.wait(FAULT_EVERY):
        kind = kinds[n % len(kinds)]
        n += 1
        at = time.monotonic()
        if kind == "kill -9":
            if procs.daemon and procs.daemon.poll() is None:
                procs.sample()
                procs.daemon.kill()
                procs.daemon.wait()
            try:
                os.unlink(procs.sock)
            except OSError:
                pass
            time.sleep(2)
            procs.start_daemon()
        elif kind == "error burst":
            inject(procs.sock, "error,every=3")
            time.sleep(5)
            inject(procs.sock, "none")
        else:
            inject(procs.sock, "stall")
            time.sleep(3)
            inject(procs.sock, "none")
        log.append({"t": round(at - log_start[0], 1), "fault": kind})


log_start = [0.0]


def key_hash(k):
    return hashlib.sha256(k.encode()).hexdigest()


def progress(stop, tally, started):
    tty = sys.stderr.isatty()
    while not stop.wait(5 if tty else 30):
        done = time.monotonic() - started
        width = 30
        fill = int(width * min(1.0, done / SECONDS))
        with tally.lock:
            ok, lost, wrong = tally.counts["ok"], tally.counts["lost"], tally.counts["wrong"]
        sys.stderr.write(f"{chr(13) if tty else ''}soak [{'#' * fill}{'.' * (width - fill)}] {done:5.0f}/{SECONDS:.0f} s  "
                         f"ok {ok}  lost {lost}  wrong {wrong}   {'' if tty else chr(10)}")
        sys.stderr.flush()
    sys.stderr.write("\n")


def main():
    os.makedirs(OUT, exist_ok=True)
    work = tempfile.mkdtemp(prefix="soak-", dir="/tmp")
    keys = {t: f"soak-{t}-{os.urandom(12).hex()}" for t in TENANTS}
    tenants_file = os.path.join(work, "tenants.yaml")
    with open(tenants_file, "w") as f:
        f.write("tenants:\n")
        for t, w in TENANTS.items():
            f.write(f"  - id: {t}\n    weight: {w}\n    api_key_sha256: [{key_hash(keys[t])}]\n")
    procs = Procs(work)
    procs.start_daemon()
    port = procs.start_gateway(tenants_file)
    if port is None:
        sys.exit("the gateway did not start; see .build-soak/soak.log")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 16 << 20),
                                                                   ("grpc.max_send_message_length", 16 << 20)])
    stub = pb_grpc.AcceleratorStub(channel)
    tally, stop, fault_log = Tally(), threading.Event(), []
    threads = []
    seed = 0
    for t in TENANTS:
        md = (("authorization", f"Bearer {keys[t]}"),)
        for kind in [unary_worker] * (THREADS_PER_TENANT - 2) + [stream_worker, submit_worker]:
            seed += 1
            threads.append(threading.Thread(target=kind, args=(stub, md, tally, stop, seed), daemon=True))
    started = time.monotonic()
    log_start[0] = started
    for th in threads:
        th.start()
    ft = threading.Thread(target=faults, args=(procs, stop, fault_log), daemon=True)
    ft.start()
    pt = threading.Thread(target=progress, args=(stop, tally, started), daemon=True)
    pt.start()
    while time.monotonic() - started < SECONDS:
        procs.sample()
        time.sleep(1)
    stop.set()
    for th in threads:
        th.join(DEADLINE * 2 + 10)
        if th.is_alive():
            tally.add("lost", f"{th.name} never finished its call")
    gateway_alive = procs.gateway.poll() is None
    procs.sample()
    procs.stop()
    result = {
        "seconds": round(time.monotonic() - started, 1), "tenants": TENANTS, "threads": len(threads),
        "fault_every_s": FAULT_EVERY, "faults": fault_log,
        "verified_ok": tally.counts["ok"], "lost": tally.counts["lost"], "wrong": tally.counts["wrong"],
        "duplicated": tally.counts["duplicated"], "statuses": dict(sorted(tally.statuses.items())),
        "examples": tally.examples, "gateway_survived": gateway_alive,
        "peak_rss_mib": {k: round(v / 1024, 1) for k, v in procs.peak.items()},
        "machine": f"{os.cpu_count()} CPUs, {os.uname().release}", "binary": os.path.relpath(BIN, ROOT),
    }
    with open(os.path.join(OUT, "soak.json"), "w") as f:
        json.dump(result, f, indent=2)
    write_markdown(result)
    print(json.dumps({k: result[k] for k in ("seconds", "verified_ok", "lost", "wrong", "duplicated",
                                              "gateway_survived", "peak_rss_mib")}, indent=2))
    bad = result["lost"] or result["wrong"] or result["duplicated"] or not gateway_alive
    sys.exit(1 if bad else 0)


def write_markdown(r):
    errors = collections.Counter()
    for k, n in r["statuses"].items():
        code = k.split(":", 1)[1]
        if code != "OK":
            errors[code] += n
    faults = collections.Counter(f["fault"] for f in r["faults"])
    lines = [
        "<!-- SOAK:BEGIN (written by make soak) -->",
        f"`make soak` ({r['seconds']:.0f} s, {r['threads']} client threads in 3 tenants of weights 1, 2, 4, "
        f"a fault every {r['fault_every_s']:.0f} s: " + ", ".join(f"{n}× {k}" for k, n in sorted(faults.items()))
        + f"; {r['machine']}; `{r.get('binary', '?')}`):",
        "",
        "| verified OK | lost | wrong | duplicated | gateway survived | peak RSS gateway | peak RSS daemon |",
        "|---|---|---|---|---|---|---|",
        f"| {r['verified_ok']} | {r['lost']} | {r['wrong']} | {r['duplicated']} | {'yes' if r['gateway_survived'] else 'NO'} "
        f"| {r['peak_rss_mib']['gateway']} MiB | {r['peak_rss_mib']['daemon']} MiB |",
        "",
        "Error statuses seen (not losses): " + (", ".join(f"{k} {n}" for k, n in errors.most_common()) or "none") + ".",
        "<!-- SOAK:END -->",
    ]
    path = os.path.join(ROOT, "docs", "BENCHMARKS.md")
    text = open(path).read()
    block = "\n".join(lines)
    if "<!-- SOAK:BEGIN" in text:
        text = re.sub(r"<!-- SOAK:BEGIN.*?<!-- SOAK:END -->", lambda _: block, text, flags=re.S)
    else:
        text += "\n## Soak (issue 17)\n\n" + block + "\n"
    open(path, "w").write(text)


if __name__ == "__main__":
    main()
