"""The standalone device daemon (`accelgate device`) and gateways attached to it.

A real daemon process serves its Unix-socket control channel; gateways started with
`--device unix://PATH` allocate their queues from it. The control channel is also
driven directly (raw frames: u32 little-endian length + JSON, memfds over
SCM_RIGHTS) to check ownership, the hello/ABI handshake, the passed memfd, reclaim
on disconnect, socket permissions and the memory budget. The last test measures
weighted round-robin between two gateways' queues on a one-engine device.

Socket paths live in short directories under /tmp (Unix socket paths are limited
to 108 bytes); the daemons' logs go to .build-interop/logs/dNNN-*.log.
"""
import fcntl
import gzip
import hashlib
import hmac
import mmap
import os
import random
import re
import signal
import stat
import struct
import subprocess
import threading
import time
import zlib

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from agtest import DEFLATE, GZIP, KiB, ZLIB, call, py_compress, py_decompress_strict, text_bytes, pb
from conftest import LOG_DIR, ROOT, server_binary
from daemonhelp import (ABI_MAJOR, ABI_MINOR, ABI_VERSION, HEADER_SIZE, REGION_MAGIC, Control, DaemonFactory,
                        capabilities, close_fds, queue_count, wait_queue_count)

FOREIGN_QUEUE = "queue {} does not belong to this gateway"


# ----------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def daemons(request):
    """daemons(*flags, label="", umask=None) starts an `accelgate device`; all are stopped
    (and must not have died, and must exit 0 on SIGTERM) when the test ends."""
    factory = DaemonFactory(request.node.name)
    yield factory
    factory.stop_all()


@pytest.fixture
def gateway(daemons, start_server):
    """gateway(daemon, *flags, label="") starts `accelgate serve --device unix://PATH`.

    Depends on `daemons` first, so gateways are stopped before their daemon."""
    def start(daemon, *flags, label=""):
        return start_server("--device", daemon.address, *flags, label=label)
    return start


def describe(srv):
    o = call(srv.stub().DescribeDevice, pb.DescribeDeviceRequest(), timeout=30)
    assert o.ok, f"DescribeDevice on gateway {srv.label} -> {o.describe()}"
    return o.response


_failing_runs = [0]


def run_gateway_expecting_failure(daemon, *flags, timeout_s: float = 60.0):
    """Runs a gateway that must not be able to start; returns (exit status, output).
    Killed (and the test failed) if it is still running after timeout_s."""
    argv = [server_binary(), "serve", "--host", "127.0.0.1", "--port", "0", "--no-metrics", "--device", daemon.address,
            *[str(f) for f in flags]]
    _failing_runs[0] += 1
    log_path = os.path.join(LOG_DIR, f"{os.path.basename(daemon.log_path)[:-4]}-failing-gateway-{_failing_runs[0]}.log")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=ROOT, start_new_session=True)
    hung = False
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        hung = True
        proc.kill()
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = out.decode(errors="replace")
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(argv) + "\n" + text + f"\n[interop] exit status {proc.returncode}"
                + (f" (killed after {timeout_s} s)" if hung else "") + "\n")
    assert not hung, f"gateway {' '.join(argv)} was still running after {timeout_s} s (expected it to exit with " \
                     f"an error); output:\n{text[-3000:]}"
    return proc.returncode, text


# ----------------------------------------------------------------------------------------
# 1. One daemon, two gateways, concurrent clients

KEY256 = bytes(range(32))
KEY128 = bytes(range(100, 116))
HMAC_KEY = b"interop-hmac-key-" * 3
AAD = b"tenant=interop"


KINDS = ("compress", "decompress", "aes256", "aes128", "chacha", "sha256", "hmac", "crc32")


def _job(stub, kind, rng, seed):
    """One call of `kind`, checked against Python's own implementation.
    Returns (kind, None, stats) on success, (kind, error text, None) on failure."""
    data = text_bytes(rng.choice([1, 700, 16 * KiB, 96 * KiB]), seed=seed)
    if kind == "compress":
        fmt = rng.choice([DEFLATE, ZLIB, GZIP])
        o = call(stub.Compress, pb.CompressRequest(format=fmt, data=data, level=rng.randint(1, 9)))
        if not o.ok:
            return kind, o.describe(), None
        if py_decompress_strict(fmt, o.response.data) != data:
            return kind, "compressed output does not decompress to the input", None
    elif kind == "decompress":
        fmt = rng.choice([DEFLATE, ZLIB, GZIP])
        o = call(stub.Decompress, pb.DecompressRequest(format=fmt, data=py_compress(fmt, data)))
        if not o.ok:
            return kind, o.describe(), None
        if o.response.data != data:
            return kind, f"decompressed {len(o.response.data)} bytes differ from the {len(data)}-byte original", None
    elif kind in ("aes256", "aes128", "chacha"):
        alg, key, ref = {
            "aes256": (pb.CIPHER_ALGORITHM_AES_256_GCM, KEY256, AESGCM(KEY256)),
            "aes128": (pb.CIPHER_ALGORITHM_AES_128_GCM, KEY128, AESGCM(KEY128)),
            "chacha": (pb.CIPHER_ALGORITHM_CHACHA20_POLY1305, KEY256, ChaCha20Poly1305(KEY256)),
        }[kind]
        nonce = os.urandom(12)
        o = call(stub.Encrypt, pb.EncryptRequest(algorithm=alg, key=pb.KeySpec(raw=key), nonce=nonce, aad=AAD,
                                                 plaintext=data))
        if not o.ok:
            return kind, o.describe(), None
        if o.response.ciphertext != ref.encrypt(nonce, data, AAD):
            return kind, "ciphertext || tag differs from cryptography's", None
        if o.response.nonce not in (b"", nonce):
            return kind, f"response nonce {o.response.nonce.hex()} is not the request's {nonce.hex()}", None
    elif kind == "sha256":
        o = call(stub.Digest, pb.DigestRequest(algorithm=pb.DIGEST_ALGORITHM_SHA256, data=data))
        if not o.ok:
            return kind, o.describe(), None
        if o.response.digest != hashlib.sha256(data).digest():
            return kind, "SHA-256 differs from hashlib's", None
    elif kind == "hmac":
        o = call(stub.Digest, pb.DigestRequest(algorithm=pb.DIGEST_ALGORITHM_HMAC_SHA256,
                                               key=pb.KeySpec(raw=HMAC_KEY), data=data))
        if not o.ok:
            return kind, o.describe(), None
        if o.response.digest != hmac.new(HMAC_KEY, data, hashlib.sha256).digest():
            return kind, "HMAC-SHA256 differs from Python's hmac", None
    else:
        o = call(stub.Digest, pb.DigestRequest(algorithm=pb.DIGEST_ALGORITHM_CRC32, data=data))
        if not o.ok:
            return kind, o.describe(), None
        want = zlib.crc32(data)
        if o.response.checksum != want or o.response.digest != struct.pack(">I", want):
            return kind, f"CRC-32 {o.response.checksum:#x}/{o.response.digest.hex()} != {want:#x}", None
    return kind, None, o.response.stats


def test_daemon_serves_two_gateways_concurrently(daemons, gateway):
    dev = daemons(label="shared")
    g1 = gateway(dev, "--queues", 2, "--queue-weight", 1, label="g1")
    g2 = gateway(dev, "--queues", 2, "--queue-weight", 2, label="g2")
    caps = capabilities(dev.path)
    assert caps["queues"] == 4, f"two gateways with 2 queues each, but the daemon has {caps['queues']}: {caps}"

    owned = {}
    for srv, weight in ((g1, 1), (g2, 2)):
        r = describe(srv)
        assert r.device.mode == "external", f"gateway {srv.label}: device.mode {r.device.mode!r}"
        assert r.device.healthy, f"gateway {srv.label}: device not healthy: {r.device}"
        assert r.device.abi_version == f"{ABI_MAJOR}.{ABI_MINOR}", r.device.abi_version
        assert len(r.queues) == 2, f"gateway {srv.label} has {len(r.queues)} queues, asked for 2"
        for q in r.queues:
            assert q.weight == weight, f"gateway {srv.label}: queue {q.id} has weight {q.weight}, asked for {weight}"
            assert q.state == "running", q
        owned[srv.label] = {q.id for q in r.queues}
    assert not owned[g1.label] & owned[g2.label], f"both gateways report the same device queue ids: {owned}"

    workers_per_gateway, jobs_per_worker = 6, 14
    failures, done, foreign = [], {g1.label: 0, g2.label: 0}, []
    lock = threading.Lock()
    start = threading.Barrier(2 * workers_per_gateway)

    def worker(srv, seed):
        stub = srv.new_stub()
        rng = random.Random(seed)
        start.wait(30)
        for i in range(jobs_per_worker):
            kind = KINDS[(seed + i) % len(KINDS)]  # every kind on both gateways, interleaved
            try:
                kind, err, stats = _job(stub, kind, rng, seed * 1000 + i)
            except Exception as e:  # a checking error is a failure too, not a dead thread
                err, stats = f"{type(e).__name__}: {e}", None
            with lock:
                if err:
                    failures.append(f"{srv.label} {kind}: {err}")
                else:
                    done[srv.label] += 1
                    if stats is not None and stats.queue_id not in owned[srv.label]:
                        foreign.append(f"{srv.label} {kind} ran on queue {stats.queue_id}, "
                                       f"its queues are {sorted(owned[srv.label])}")

    threads = [threading.Thread(target=worker, args=(srv, i * 10 + j))
               for i, srv in enumerate((g1, g2)) for j in range(workers_per_gateway)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(240)
    assert not any(th.is_alive() for th in threads), "client threads still running after 240 s"
    assert not failures, f"{len(failures)} of {2 * workers_per_gateway * jobs_per_worker} calls failed: {failures[:5]}"
    assert done == {g1.label: workers_per_gateway * jobs_per_worker, g2.label: workers_per_gateway * jobs_per_worker}
    assert not foreign, f"jobs ran on another gateway's queues: {foreign[:5]}"
    for srv in (g1, g2):
        assert sum(q.completed for q in describe(srv).queues) >= workers_per_gateway * jobs_per_worker
    assert dev.alive()


# ----------------------------------------------------------------------------------------
# 2. Control channel: ownership, hello, ABI, the passed memfd


def test_release_of_another_gateways_queue_is_refused(daemons):
    dev = daemons()
    with Control(dev.path) as a, Control(dev.path) as b:
        a.hello()
        b.hello()
        qa, fa = a.alloc(weight=2)
        qb, fb = b.alloc(weight=1)
        close_fds([fa, fb])
        assert qa != qb, f"two allocations got the same queue id {qa}"
        assert queue_count(dev.path) == 2

        r = b.ask({"op": "release", "queue": qa})
        assert r.get("ok") is False, f"B released A's queue {qa}: request release queue={qa} from B -> {r}"
        assert r.get("error") == FOREIGN_QUEUE.format(qa), f"release of A's queue by B -> {r}"
        r = a.ask({"op": "release", "queue": qb})
        assert r.get("ok") is False and r.get("error") == FOREIGN_QUEUE.format(qb), f"A released B's queue: {r}"
        r = b.ask({"op": "release", "queue": 4000})
        assert r.get("ok") is False and r.get("error") == FOREIGN_QUEUE.format(4000), \
            f"release of a queue that does not exist -> {r}"
        assert queue_count(dev.path) == 2, "a refused release removed a queue"

        r = a.ask({"op": "release", "queue": qa})
        assert r.get("ok") is True, f"A could not release its own queue {qa}: {r}"
        wait_queue_count(dev.path, 1, within_s=5, what="after A released its queue")
        r = a.ask({"op": "release", "queue": qa})
        assert r.get("ok") is False and r.get("error") == FOREIGN_QUEUE.format(qa), f"second release of {qa} -> {r}"

        # B's queue survived all this and is still B's to release.
        r = b.ask({"op": "release", "queue": qb})
        assert r.get("ok") is True, f"B could not release its own queue {qb}: {r}"
        wait_queue_count(dev.path, 0, within_s=5, what="after B released its queue")


def test_requests_before_hello_are_refused(daemons):
    dev = daemons()
    with Control(dev.path) as c:
        for req in ({"op": "capabilities"}, {"op": "alloc", "weight": 1}, {"op": "release", "queue": 0},
                    {"op": "heartbeat"}):
            reply, fds = c.request(req)
            close_fds(fds)
            assert reply.get("ok") is False, f"request {req} before hello: expected ok:false, got {reply}"
            assert "hello" in (reply.get("error") or "").lower(), \
                f"request {req} before hello: error does not say to say hello first: {reply}"
            assert not fds, f"request {req} before hello passed {len(fds)} descriptor(s)"
            assert "queue" not in reply, f"request {req} before hello -> {reply}"
        assert queue_count(dev.path) == 0, "an alloc before hello created a queue"
        # The same connection works once it has said hello.
        c.hello()
        assert c.capabilities()["queues"] == 0
        q, fd = c.alloc()
        os.close(fd)
        assert c.ask({"op": "release", "queue": q}).get("ok") is True


@pytest.mark.parametrize("major,minor", [(ABI_MAJOR + 1, 1), (0, 9)])
def test_hello_with_another_abi_major_is_refused(daemons, major, minor):
    dev = daemons()
    theirs = (major << 16) | minor
    with Control(dev.path) as c:
        r = c.ask({"op": "hello", "abi": theirs})
        assert r.get("ok") is False, f"request hello abi={theirs:#x} ({major}.{minor}): expected ok:false, got {r}"
        msg = r.get("error") or ""
        assert f"{ABI_MAJOR}.{ABI_MINOR}" in msg and f"{major}.{minor}" in msg, \
            f"hello {major}.{minor}: the message must name both versions ({ABI_MAJOR}.{ABI_MINOR} and " \
            f"{major}.{minor}): {msg!r}"
        # A refused hello is no hello.
        reply, fds = c.request({"op": "alloc", "weight": 1})
        close_fds(fds)
        assert reply.get("ok") is False and not fds, f"alloc after a refused hello -> {reply}, {len(fds)} fd(s)"
        # Same major, older minor: compatible.
        r = c.ask({"op": "hello", "abi": (ABI_MAJOR << 16) | 0})
        assert r.get("ok") is True and r.get("abi") == ABI_VERSION, f"hello {ABI_MAJOR}.0 -> {r}"
    assert queue_count(dev.path) == 0


def test_alloc_passes_a_sealed_memfd_with_the_region_header(daemons):
    dev = daemons("--pool-mib", 8)
    with Control(dev.path) as c:
        r = c.hello()
        assert r.get("abi") == ABI_VERSION, f"hello reply: {r}"
        q, fd = c.alloc(weight=3)
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            assert target.startswith("/memfd:"), f"the passed descriptor is {target!r}, not a memfd"
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_SHRINK, f"memfd seals {seals:#x} lack F_SEAL_SHRINK"
            # docs/DEVICE_ABI.md: sealed with F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL.
            assert seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL, f"memfd seals {seals:#x}"
            size = os.fstat(fd).st_size
            assert size >= HEADER_SIZE, f"region of {size} bytes is smaller than its {HEADER_SIZE}-byte header"
            assert size >= 8 << 20, f"region of {size} bytes cannot hold the 8 MiB data pool"
            with mmap.mmap(fd, HEADER_SIZE, prot=mmap.PROT_READ) as m:
                header = bytes(m[:HEADER_SIZE])
        finally:
            os.close(fd)
        assert header[0:4] == REGION_MAGIC, f"region magic {header[0:4]!r}, expected {REGION_MAGIC!r}"
        abi, header_size, queue_id, region_size = struct.unpack_from("<IIIQ", header, 4)
        assert abi >> 16 == ABI_MAJOR, f"region abi_version {abi:#x}"
        assert header_size == HEADER_SIZE, f"region header_size {header_size}"
        assert queue_id == q, f"region queue_id {queue_id}, alloc said queue {q}"
        assert region_size == size, f"region_size {region_size} in the header, the memfd has {size} bytes"
        (weight,) = struct.unpack_from("<I", header, 104)
        assert weight == 3, f"region weight {weight}, asked for 3"
        caps = c.capabilities()
        assert caps.get("regionBytes") == size, f"capabilities regionBytes {caps.get('regionBytes')} != {size}"


def test_heartbeat_advances(daemons):
    dev = daemons()
    with Control(dev.path) as c:
        c.hello()
        q, fd = c.alloc()
        os.close(fd)
        first = c.ask({"op": "heartbeat"})
        assert first.get("ok") is True and isinstance(first.get("heartbeat"), int), f"heartbeat -> {first}"
        deadline = time.monotonic() + 5
        while True:
            now = c.ask({"op": "heartbeat"})
            if now.get("heartbeat", 0) > first["heartbeat"]:
                break
            assert time.monotonic() < deadline, f"heartbeat stuck at {first['heartbeat']} for 5 s: {now}"
            time.sleep(0.05)


# ----------------------------------------------------------------------------------------
# 3. Reclaim


def reclaimed_ids(line: str) -> set:
    """The queue ids in a daemon log line "... reclaimed queues [1, 2]"."""
    m = re.search(r"reclaimed queues \[([0-9, ]*)\]", line)
    assert m, f"cannot read the queue list in the daemon log line: {line}"
    return {int(x) for x in m.group(1).replace(",", " ").split()}


def test_queues_of_a_closed_connection_are_reclaimed(daemons):
    dev = daemons()
    with Control(dev.path) as keeper:  # a queue that must survive the other connection's reclaim
        keeper.hello()
        kq, kfd = keeper.alloc()
        os.close(kfd)
        base = queue_count(dev.path)
        assert base == 1
        c = Control(dev.path)
        try:
            c.hello()
            ids = []
            for _ in range(2):
                q, fd = c.alloc(weight=2)
                os.close(fd)
                ids.append(q)
            assert queue_count(dev.path) == base + 2
        finally:
            c.close()
        took = wait_queue_count(dev.path, base, within_s=5, what="after the connection closed")
        line = dev.wait_log(r"reclaimed queues", within_s=5)[-1]
        assert reclaimed_ids(line) == set(ids), f"reclaim log line does not name exactly queues {ids}: {line}"
        r = keeper.ask({"op": "release", "queue": kq})
        assert r.get("ok") is True, f"keeper's queue {kq} is gone after another connection closed: {r}"
        print(f"reclaimed in {took:.2f} s")


def test_queues_of_a_killed_gateway_are_reclaimed(daemons, gateway):
    dev = daemons()
    survivor = gateway(dev, "--queues", 1, label="survivor")
    victim = gateway(dev, "--queues", 2, label="victim")
    assert queue_count(dev.path) == 3
    victim_queues = sorted(q.id for q in describe(victim).queues)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    victim.death_reported_in = "killed with SIGKILL by the test"  # an expected death
    took = wait_queue_count(dev.path, 1, within_s=10, what="after SIGKILL of a gateway with 2 queues")
    line = dev.wait_log(r"reclaimed queues", within_s=5)[-1]
    assert f"pid {victim.proc.pid} " in line and reclaimed_ids(line) == set(victim_queues), \
        f"reclaim log line does not name pid {victim.proc.pid} and queues {victim_queues}: {line}"
    # The other gateway is untouched and still served by the daemon.
    r = describe(survivor)
    assert r.device.healthy and [q.state for q in r.queues] == ["running"], r
    data = text_bytes(32 * KiB, seed=5)
    o = call(survivor.stub().Compress, pb.CompressRequest(format=GZIP, data=data), timeout=30)
    assert o.ok and gzip.decompress(o.response.data) == data, f"survivor after the kill: {o.describe()}"
    print(f"reclaimed in {took:.2f} s")


# ----------------------------------------------------------------------------------------
# 4. Socket permissions


def test_socket_is_not_world_accessible(daemons):
    # umask 0: the daemon itself must restrict the mode, not the caller's umask.
    dev = daemons(label="umask0", umask=0)
    st = os.stat(dev.path)
    assert stat.S_ISSOCK(st.st_mode), f"{dev.path} is not a socket: {oct(st.st_mode)}"
    mode = stat.S_IMODE(st.st_mode)
    assert mode & 0o007 == 0, f"control socket mode {mode:#o} gives access to every user"
    assert mode & 0o600 == 0o600, f"control socket mode {mode:#o}: the owner cannot read and write it"
    assert queue_count(dev.path) == 0  # and it works
    dev.stop()
    assert not os.path.exists(dev.path), "the daemon left its socket file behind after SIGTERM"


def test_sigterm_right_after_listening_line_stops_cleanly(daemons):
    """The listening line says the daemon is up; a supervisor may stop it at once.
    SIGTERM must then still be a clean stop: exit status 0 and the socket file removed.
    (Up to 12 attempts: the window after the line is about a millisecond wide.)"""
    for i in range(12):
        dev = daemons(label=f"quick-stop-{i}")
        try:
            dev.stop(settle=False)
        except AssertionError as e:
            raise AssertionError(f"SIGTERM sent right after the line 'accelgate device listening on {dev.path}' "
                                 f"(attempt {i + 1}): {str(e).splitlines()[0]}; socket file left behind: "
                                 f"{os.path.exists(dev.path)}") from None
        assert not os.path.exists(dev.path), \
            f"attempt {i + 1}: the daemon exited 0 but left its socket file {dev.path} behind"


# ----------------------------------------------------------------------------------------
# 5. Memory budget

BUDGET_MIB = 20
POOL_MIB = 8  # regions of a little over 8 MiB: two fit in 20 MiB, three do not


def test_memory_budget_refuses_alloc_and_failing_gateway_exits(daemons, gateway):
    dev = daemons("--pool-mib", POOL_MIB, "--memory-budget-mib", BUDGET_MIB)
    budget = BUDGET_MIB << 20
    hog = Control(dev.path)
    try:
        hog.hello()
        q0, fd = hog.alloc()
        region = os.fstat(fd).st_size
        os.close(fd)
        caps = hog.capabilities()
        assert caps.get("memoryBudget") == budget, f"capabilities memoryBudget: {caps}"
        fit = budget // region
        assert fit == 2, f"test setup: regions of {region} bytes, {fit} fit in {BUDGET_MIB} MiB (expected 2)"
        q1, fd = hog.alloc()
        os.close(fd)
        reply, fds = hog.request({"op": "alloc", "weight": 1})
        close_fds(fds)
        assert reply.get("ok") is False, \
            f"request alloc with {2 * region} of {budget} bytes in use: expected ok:false, got {reply}"
        assert not fds and "queue" not in reply, f"refused alloc passed {len(fds)} fd(s) / {reply}"
        assert "budget" in (reply.get("error") or ""), f"refused alloc does not say why: {reply}"
        assert queue_count(dev.path) == 2

        # A gateway that cannot get even one queue exits with a clear error.
        rc, out = run_gateway_expecting_failure(dev, "--queues", 1)
        assert rc != 0, f"gateway with no device memory left exited with 0:\n{out[-2000:]}"
        assert "budget" in out, f"gateway exit {rc} without naming the memory budget:\n{out[-2000:]}"
        assert "accelgate listening on" not in out, f"gateway listened although it had no queue:\n{out[-2000:]}"
        assert queue_count(dev.path) == 2

        # One queue free: a gateway asking for two gets one, then fails, and gives it back.
        assert hog.ask({"op": "release", "queue": q1}).get("ok") is True
        wait_queue_count(dev.path, 1, within_s=5)
        rc, out = run_gateway_expecting_failure(dev, "--queues", 2)
        assert rc != 0 and "budget" in out, f"gateway asking for 2 queues with room for 1 -> exit {rc}:\n{out[-2000:]}"
        wait_queue_count(dev.path, 1, within_s=10, what="after the half-attached gateway exited")
    finally:
        hog.close()
    # With the budget free again, a gateway attaches and serves.
    wait_queue_count(dev.path, 0, within_s=5, what="after the hog closed")
    g = gateway(dev, "--queues", 2, "--max-request-bytes", 1 << 20, "--max-decompressed-bytes", 1 << 20,
                label="after-budget")
    assert describe(g).device.mode == "external"
    data = text_bytes(64 * KiB, seed=9)
    o = call(g.stub().Compress, pb.CompressRequest(format=ZLIB, data=data), timeout=30)
    assert o.ok and zlib.decompress(o.response.data) == data, o.describe()
    assert queue_count(dev.path) == 2


# ----------------------------------------------------------------------------------------
# 6. Weighted round-robin between gateways

FAIR_WEIGHTS = {"A": 1, "B": 3}
FAIR_CALLERS = 8
FAIR_JOB = 64 * KiB
FAIR_RUN_S = 5.0
FAIR_WARMUP_S = 1.25
FAIR_COOLDOWN_S = 0.75
FAIR_TOLERANCE = 0.25  # relative
# Each gateway keeps up to 8 descriptors on its queue (--in-flight-per-queue's default)
# and up to 200 ms of estimated device time: 64 KiB at 8 MB/s is about 8 ms, and with
# the default 2 ms budget each queue would hold a single job, so the device would
# never see both queues backlogged and round-robin weights could not show.
FAIR_GATEWAY_FLAGS = ("--queues", 1, "--in-flight-per-queue", 8, "--in-flight-budget-us", 200_000)
_FAIR_POOL = os.urandom(FAIR_JOB + 4096)  # random data: every job costs the same at the cap


def test_device_time_follows_queue_weights_between_gateways(daemons, gateway):
    dev = daemons("--engines", 1, "--engine-cap-mbps", 8, label="wrr")
    gws = {name: gateway(dev, "--queue-weight", w, *FAIR_GATEWAY_FLAGS, label=f"w{w}")
           for name, w in FAIR_WEIGHTS.items()}
    for name, srv in gws.items():
        r = describe(srv)
        assert r.device.mode == "external" and [q.weight for q in r.queues] == [FAIR_WEIGHTS[name]], r

    device_ns = {name: 0 for name in gws}
    calls = {name: 0 for name in gws}
    failures = []
    lock = threading.Lock()
    ready = threading.Barrier(len(gws) * FAIR_CALLERS + 1)
    go = threading.Event()
    clock = {}

    def caller(name, seed):
        stub = gws[name].new_stub()  # own connection per caller
        rng = random.Random(seed)
        ready.wait(30)
        go.wait(30)
        while time.monotonic() < clock["stop"]:
            off = rng.randrange(4096)
            o = call(stub.Compress, pb.CompressRequest(format=GZIP, data=_FAIR_POOL[off:off + FAIR_JOB], level=1),
                     timeout=30)
            done = time.monotonic()
            with lock:
                if not o.ok:
                    failures.append(f"{name}: {o.describe()}")
                    continue
                calls[name] += 1
                if clock["lo"] <= done < clock["hi"]:
                    device_ns[name] += o.response.stats.device_ns

    threads = [threading.Thread(target=caller, args=(name, i * 100 + j))
               for i, name in enumerate(gws) for j in range(FAIR_CALLERS)]
    for th in threads:
        th.start()
    ready.wait(30)
    start = time.monotonic()
    clock.update(stop=start + FAIR_RUN_S, lo=start + FAIR_WARMUP_S, hi=start + FAIR_RUN_S - FAIR_COOLDOWN_S)
    go.set()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads), "callers still running 60 s after the run"
    assert not failures, f"{len(failures)} calls failed: {failures[:3]}"

    total = sum(device_ns.values())
    window = FAIR_RUN_S - FAIR_WARMUP_S - FAIR_COOLDOWN_S
    share_b = device_ns["B"] / total if total else 0.0
    print(f"B (weight 3) share {share_b:.1%}; device {total / 1e9:.2f} s in a {window:.2f} s window; calls {calls}")
    # One engine kept busy, or nobody was backlogged and the shares mean nothing. (Not 100 %:
    # device_ns is the modeled time at the cap, and the engine's pacing sleeps overshoot it.)
    assert total / 1e9 > 0.5 * window, \
        f"only {total / 1e9:.2f} s of device time in a {window:.2f} s window: the device was not saturated"
    want = FAIR_WEIGHTS["B"] / sum(FAIR_WEIGHTS.values())
    assert abs(share_b - want) <= FAIR_TOLERANCE * want, \
        f"gateway B (queue weight 3) got {share_b:.1%} of device time against gateway A (weight 1), " \
        f"expected {want:.0%} +-{FAIR_TOLERANCE:.0%} relative; device ns {device_ns}; calls {calls}"


def test_a_peer_is_bounded_in_queues_weight_and_memory(daemons):
    """Issue 17, finding 12 (Part 3): the daemon bounded neither a peer's weight (up
    to 2^32, a share of every engine) nor its number of queues or their memory.
    Each is now a quota with a defined refusal, and another peer is unaffected."""
    dev = daemons("--pool-mib", "1", "--max-queues-per-peer", "3", "--max-queue-weight", "8", "--max-peer-mib", "64")
    with Control(dev.path) as a, Control(dev.path) as b:
        a.hello()
        b.hello()
        r = a.ask({"op": "alloc", "weight": 9})
        assert r.get("ok") is False and r.get("quota") == "max-queue-weight", r
        r = a.ask({"op": "alloc", "weight": 2 ** 32 - 1})
        assert r.get("ok") is False and r.get("quota") == "max-queue-weight", r
        held = []
        for _ in range(3):
            q, fd = a.alloc(weight=8)
            held.append(fd)
        r, fds = a.request({"op": "alloc", "weight": 1})
        close_fds(fds)
        assert r.get("ok") is False and r.get("quota") == "max-queues-per-peer", r
        # The other peer still gets queues.
        q, fd = b.alloc(weight=1)
        held.append(fd)
        close_fds(held)
    dev2 = daemons("--pool-mib", "4", "--max-peer-mib", "6", label="peer-memory")
    with Control(dev2.path) as c:
        c.hello()
        q, fd = c.alloc()
        close_fds([fd])
        r, fds = c.request({"op": "alloc", "weight": 1})
        close_fds(fds)
        assert r.get("ok") is False and r.get("quota") == "max-region-bytes-per-peer", r
