"""The local lane (issue 10): co-located clients register sealed memfds over the
gateway's control socket and name spans of them in gRPC calls over its Unix
socket. The device reads and writes the client's pages in place; the results
are checked on the client's own buffers with Python's zlib, gzip, hashlib and
cryptography."""
import gzip
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib

import grpc
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from accelgate.v1 import accelerator_pb2_grpc as pb_grpc
from agtest import Tenant, new_key, pb, write_tenants
from daemonhelp import DaemonFactory, short_tmpdir
from locallane import ControlChannel

MiB = 1 << 20
WBITS = {pb.COMPRESSION_FORMAT_GZIP: 31, pb.COMPRESSION_FORMAT_ZLIB: 15, pb.COMPRESSION_FORMAT_DEFLATE: -15}


def sample(n, seed=3):
    rnd = os.urandom(4096)
    lines = b"".join(b"%d local lane line %d\n" % (i, i * seed) for i in range(n // 20 + 1))
    return (lines[: n // 2] + rnd * (n // 8192 + 1))[:n]


class Lane:
    """A gateway with the local lane on, and a tenant's view of it."""

    def __init__(self, srv, sock_path, tenants):
        self.srv, self.sock_path, self.tenants = srv, sock_path, tenants
        self.channel = grpc.insecure_channel(f"unix:{sock_path}", options=[
            ("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)])
        self.stub = pb_grpc.AcceleratorStub(self.channel)

    def control(self, tenant):
        return ControlChannel(self.sock_path + ".ctl", api_key=self.tenants[tenant].keys[0])

    def md(self, tenant):
        return self.tenants[tenant].md


def start_lane(start_server, tmp_path, *flags, label="lane"):
    tenants = {n: Tenant(n, [new_key(n)]) for n in ("alpha", "beta")}
    path = write_tenants(str(tmp_path / "tenants.yaml"), list(tenants.values()))
    sock = os.path.join(short_tmpdir("agl-"), "ag.sock")
    srv = start_server("--tenants", path, "--local-socket", sock, *flags, label=label)
    return Lane(srv, sock, tenants)


@pytest.fixture
def lane(start_server, tmp_path):
    lane = start_lane(start_server, tmp_path)
    yield lane
    lane.channel.close()


def expect_code(fn, code, fragment=""):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    assert e.value.code() == code, f"{e.value.code()} {e.value.details()}"
    assert fragment in (e.value.details() or ""), e.value.details()
    return e.value


@pytest.mark.parametrize("fmt", list(WBITS))
def test_compression_round_trips_in_the_clients_own_memory(lane, fmt):
    ctl = lane.control("alpha")
    region = ctl.register(8 * MiB)
    data = sample(3 * MiB)
    region.write(0, data)
    r = lane.stub.Compress(pb.CompressRequest(format=fmt, level=1, input_region=region.span(0, len(data)),
                                              output_region=region.span(4 * MiB, 4 * MiB)),
                           metadata=lane.md("alpha"), timeout=60)
    assert r.data == b"" and r.region_output_length > 0
    packed = region.read(4 * MiB, r.region_output_length)
    assert zlib.decompress(packed, WBITS[fmt]) == data
    if fmt == pb.COMPRESSION_FORMAT_GZIP:
        assert gzip.decompress(packed) == data
    # And back: the compressed bytes stay where they are, the output goes to offset 0.
    region.write(0, b"\0" * len(data))
    d = lane.stub.Decompress(pb.DecompressRequest(format=fmt, input_region=region.span(4 * MiB, len(packed)),
                                                  output_region=region.span(0, 4 * MiB)),
                             metadata=lane.md("alpha"), timeout=60)
    assert d.region_output_length == len(data) and region.read(0, len(data)) == data
    # Input from the region, output inline in the response, works too.
    i = lane.stub.Compress(pb.CompressRequest(format=fmt, input_region=region.span(0, len(data))),
                           metadata=lane.md("alpha"), timeout=60)
    assert zlib.decompress(i.data, WBITS[fmt]) == data
    ctl.close()


@pytest.mark.parametrize("alg", ["aes-256-gcm", "chacha20-poly1305"])
def test_aead_round_trips_in_the_clients_own_memory(lane, alg):
    algorithm, cls = {"aes-256-gcm": (pb.CIPHER_ALGORITHM_AES_256_GCM, AESGCM),
                      "chacha20-poly1305": (pb.CIPHER_ALGORITHM_CHACHA20_POLY1305, ChaCha20Poly1305)}[alg]
    key, nonce, aad = os.urandom(32), os.urandom(12), b"header"
    ctl = lane.control("alpha")
    region = ctl.register(4 * MiB)
    plaintext = os.urandom(MiB + 17)
    region.write(0, plaintext)
    e = lane.stub.Encrypt(pb.EncryptRequest(algorithm=algorithm, key=pb.KeySpec(raw=key), nonce=nonce, aad=aad,
                                            input_region=region.span(0, len(plaintext)),
                                            output_region=region.span(2 * MiB, 2 * MiB)),
                          metadata=lane.md("alpha"), timeout=60)
    assert e.ciphertext == b"" and e.region_output_length == len(plaintext) + 16
    sealed = region.read(2 * MiB, e.region_output_length)
    assert cls(key).decrypt(nonce, sealed, aad) == plaintext
    region.write(0, b"\0" * len(plaintext))
    d = lane.stub.Decrypt(pb.DecryptRequest(algorithm=algorithm, key=pb.KeySpec(raw=key), nonce=nonce, aad=aad,
                                            input_region=region.span(2 * MiB, len(sealed)),
                                            output_region=region.span(0, 2 * MiB)),
                          metadata=lane.md("alpha"), timeout=60)
    assert d.region_output_length == len(plaintext) and region.read(0, len(plaintext)) == plaintext
    # A flipped tag bit is refused, as on the network lane.
    region.write(2 * MiB + len(sealed) - 1, bytes([sealed[-1] ^ 1]))
    expect_code(lambda: lane.stub.Decrypt(
        pb.DecryptRequest(algorithm=algorithm, key=pb.KeySpec(raw=key), nonce=nonce, aad=aad,
                          input_region=region.span(2 * MiB, len(sealed)), output_region=region.span(0, 2 * MiB)),
        metadata=lane.md("alpha"), timeout=60), grpc.StatusCode.INVALID_ARGUMENT)


def test_digests_read_the_clients_memory(lane):
    ctl = lane.control("alpha")
    region = ctl.register(MiB)
    data = os.urandom(MiB)
    region.write(0, data)
    for alg, want in ((pb.DIGEST_ALGORITHM_SHA256, hashlib.sha256(data).digest()),
                      (pb.DIGEST_ALGORITHM_SHA512, hashlib.sha512(data).digest())):
        r = lane.stub.Digest(pb.DigestRequest(algorithm=alg, input_region=region.span(0, MiB)),
                             metadata=lane.md("alpha"), timeout=60)
        assert r.digest == want


def test_another_tenants_region_is_permission_denied(lane):
    alpha = lane.control("alpha")
    region = alpha.register(MiB)
    region.write(0, b"secret of alpha" * 100)
    err = expect_code(lambda: lane.stub.Compress(
        pb.CompressRequest(format=pb.COMPRESSION_FORMAT_ZLIB, input_region=region.span(0, 1500)),
        metadata=lane.md("beta"), timeout=30), grpc.StatusCode.PERMISSION_DENIED, "another tenant")
    assert "secret" not in err.details()
    # Beta cannot unregister it either; alpha still can use it.
    beta = lane.control("beta")
    assert not beta.unregister(region)["ok"]
    r = lane.stub.Compress(pb.CompressRequest(format=pb.COMPRESSION_FORMAT_ZLIB, input_region=region.span(0, 1500)),
                           metadata=lane.md("alpha"), timeout=30)
    assert zlib.decompress(r.data) == b"secret of alpha" * 100


def test_bad_spans_get_clear_statuses(lane):
    ctl = lane.control("alpha")
    region = ctl.register(MiB)
    md = lane.md("alpha")

    def compress(**kw):
        return lambda: lane.stub.Compress(pb.CompressRequest(format=pb.COMPRESSION_FORMAT_GZIP, **kw), metadata=md,
                                          timeout=30)
    expect_code(compress(input_region=region.span(MiB - 10, 11)), grpc.StatusCode.INVALID_ARGUMENT, "outside")
    expect_code(compress(input_region=region.span(2 ** 63, 1)), grpc.StatusCode.INVALID_ARGUMENT, "outside")
    expect_code(compress(input_region=region.span(0, 1000), output_region=region.span(MiB - 5, 64)),
                grpc.StatusCode.INVALID_ARGUMENT, "outside")
    expect_code(compress(input_region=region.span(0, 4096), output_region=region.span(2048, 8192)),
                grpc.StatusCode.INVALID_ARGUMENT, "overlap")
    expect_code(compress(data=b"x", input_region=region.span(0, 10)), grpc.StatusCode.INVALID_ARGUMENT, "not both")
    expect_code(compress(input_region=pb.RegionSpan(region="r9-nope", offset=0, length=1)), grpc.StatusCode.NOT_FOUND)
    # Too small an output span for a compression that does not shrink: a clear error, nothing written past it.
    noise = os.urandom(64 * 1024)
    region.write(0, noise)
    region.write(512 * 1024 + 100, b"GUARD")
    expect_code(compress(input_region=region.span(0, len(noise)), output_region=region.span(512 * 1024, 100)),
                grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert region.read(512 * 1024 + 100, 5) == b"GUARD"
    # Regions cannot be used without credentials.
    expect_code(lambda: lane.stub.Compress(pb.CompressRequest(format=pb.COMPRESSION_FORMAT_GZIP,
                                                              input_region=region.span(0, 10)), timeout=30),
                grpc.StatusCode.UNAUTHENTICATED)
    # The gateway still serves.
    r = lane.stub.Compress(pb.CompressRequest(format=pb.COMPRESSION_FORMAT_GZIP, data=b"fine"), metadata=md, timeout=30)
    assert gzip.decompress(r.data) == b"fine"


def test_unsealed_short_or_keyless_memfds_are_refused(lane):
    ctl = lane.control("alpha")
    r = ctl.register(MiB, seal=False, expect_ok=False)
    assert not r.reply["ok"] and "F_SEAL_SHRINK" in r.reply["error"]
    r = ctl.register(MiB, file_size=4096, expect_ok=False)
    assert not r.reply["ok"] and "fewer than" in r.reply["error"]
    r = ctl.register(0, file_size=4096, claim=0, expect_ok=False)
    assert not r.reply["ok"]
    wrong = ControlChannel(lane.sock_path + ".ctl", api_key="not-a-key")
    r = wrong.register(4096, expect_ok=False)
    assert not r.reply["ok"] and "unknown API key" in r.reply["error"]
    # The control connection survives refusals and still registers a good region.
    good = ctl.register(MiB)
    assert good.token


def test_unregister_waits_for_the_job_in_flight_then_the_token_is_gone(start_server, tmp_path):
    # A slow engine (2 MB/s) makes a 2 MiB job take about a second.
    lane = start_lane(start_server, tmp_path, "--engines", 1, "--engine-cap-mbps", 2, label="slow")
    ctl = lane.control("alpha")
    region = ctl.register(4 * MiB)
    data = sample(2 * MiB)
    region.write(0, data)
    call = lane.stub.Compress.future(pb.CompressRequest(format=pb.COMPRESSION_FORMAT_ZLIB, level=1,
                                                        input_region=region.span(0, len(data)),
                                                        output_region=region.span(2 * MiB, 2 * MiB)),
                                     metadata=lane.md("alpha"), timeout=60)
    time.sleep(0.3)
    assert not call.done()
    other = lane.control("alpha")
    reply = other.unregister(region)
    # unregister returned only after the device finished the job: the output was
    # already complete in the client's memory at that moment.
    assert reply["ok"], reply
    snapshot = region.read(2 * MiB, 2 * MiB)
    r = call.result()
    assert zlib.decompress(snapshot[:r.region_output_length]) == data
    expect_code(lambda: lane.stub.Compress(
        pb.CompressRequest(format=pb.COMPRESSION_FORMAT_ZLIB, input_region=region.span(0, 10)),
        metadata=lane.md("alpha"), timeout=30), grpc.StatusCode.NOT_FOUND)


CLIENT = textwrap.dedent("""
    import sys, time
    sys.path[:0] = {paths!r}
    import grpc
    from agtest import pb
    from accelgate.v1 import accelerator_pb2_grpc as pb_grpc
    from locallane import ControlChannel
    ctl = ControlChannel({ctl!r}, api_key={key!r})
    region = ctl.register(8 << 20)
    region.write(0, bytes(range(256)) * (4 << 12))
    stub = pb_grpc.AcceleratorStub(grpc.insecure_channel("unix:" + {sock!r}))
    fut = stub.Compress.future(pb.CompressRequest(format=pb.COMPRESSION_FORMAT_GZIP, level=9,
                               input_region=region.span(0, 4 << 20), output_region=region.span(4 << 20, 4 << 20)),
                               metadata=(("authorization", "Bearer " + {key!r}),), timeout=60)
    print("submitted", flush=True)
    time.sleep(60)
""")


def payload_jobs(lane, operations):
    """Calls whose payload came in over gRPC (local-lane calls are not counted)."""
    import re
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{lane.srv.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(v) for labels, v in re.findall(r"^accelgate_payload_jobs_total\{([^}]*)\} ([0-9.e+-]+)$", text, re.M)
               if 'direction="in"' in labels and any(f'operation="{o}"' in labels for o in operations))


def gauge(lane, name):
    import re
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{lane.srv.metrics_port}/metrics", timeout=10).read().decode()
    m = re.search(r"^%s ([0-9.e+-]+)$" % re.escape(name), text, re.M)
    assert m, f"{name} not exported"
    return float(m.group(1))


def test_a_client_killed_mid_job_leaves_the_gateway_serving_the_others(start_server, tmp_path):
    lane = start_lane(start_server, tmp_path, "--engines", 1, "--engine-cap-mbps", 4, label="kill")
    here = os.path.dirname(os.path.abspath(__file__))
    import gen_stubs
    script = CLIENT.format(paths=[here, gen_stubs.OUT], ctl=lane.sock_path + ".ctl", sock=lane.sock_path, key=lane.tenants["beta"].keys[0])
    victim = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert victim.stdout.readline().strip() == b"submitted", victim.stderr.read().decode()
        # The 4 MiB job is under way (4 MB/s: about a second) on the victim's region.
        t0 = time.monotonic()
        while gauge(lane, "accelgate_local_region_spans_in_use") < 1 and time.monotonic() - t0 < 10:
            time.sleep(0.02)
        assert gauge(lane, "accelgate_local_region_spans_in_use") >= 1, "the victim's job never started"
        assert gauge(lane, "accelgate_local_regions") == 1
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
    finally:
        if victim.poll() is None:
            victim.kill()
    # The dead client's region goes once its job is done (its connection closed; the device finished with it).
    t0 = time.monotonic()
    while gauge(lane, "accelgate_local_regions") > 0 and time.monotonic() - t0 < 20:
        time.sleep(0.1)
    assert gauge(lane, "accelgate_local_regions") == 0 and gauge(lane, "accelgate_local_region_spans_in_use") == 0
    # The others are served, on both lanes, and new regions can be registered.
    ctl = lane.control("alpha")
    region = ctl.register(MiB)
    region.write(0, b"still here " * 1000)
    r = lane.stub.Compress(pb.CompressRequest(format=pb.COMPRESSION_FORMAT_ZLIB, input_region=region.span(0, 11000)),
                           metadata=lane.md("alpha"), timeout=60)
    assert zlib.decompress(r.data) == b"still here " * 1000
    tcp = lane.srv.stub().Compress(pb.CompressRequest(format=pb.COMPRESSION_FORMAT_ZLIB, data=b"tcp too"),
                                   metadata=lane.md("alpha"), timeout=60)
    assert zlib.decompress(tcp.data) == b"tcp too"
    assert lane.srv.alive()


def test_the_local_lane_works_through_a_standalone_device_daemon(request, start_server, tmp_path):
    """The memfd travels on: client → gateway (control socket) → daemon (its control
    socket, SCM_RIGHTS again); the daemon's engines work on the client's pages."""
    daemons = DaemonFactory(request.node.name)
    try:
        daemon = daemons()
        lane = start_lane(start_server, tmp_path, "--device", daemon.address, label="daemon")
        ctl = lane.control("alpha")
        region = ctl.register(4 * MiB)
        data = sample(MiB)
        region.write(0, data)
        r = lane.stub.Compress(pb.CompressRequest(format=pb.COMPRESSION_FORMAT_GZIP, input_region=region.span(0, len(data)),
                                                  output_region=region.span(2 * MiB, 2 * MiB)),
                               metadata=lane.md("alpha"), timeout=60)
        assert gzip.decompress(region.read(2 * MiB, r.region_output_length)) == data
        key, nonce = os.urandom(32), os.urandom(12)
        e = lane.stub.Encrypt(pb.EncryptRequest(algorithm=pb.CIPHER_ALGORITHM_AES_256_GCM, key=pb.KeySpec(raw=key),
                                                nonce=nonce, input_region=region.span(0, len(data)),
                                                output_region=region.span(2 * MiB, 2 * MiB)),
                              metadata=lane.md("alpha"), timeout=60)
        assert AESGCM(key).decrypt(nonce, region.read(2 * MiB, e.region_output_length), None) == data
        assert ctl.unregister(region)["ok"]
        lane.channel.close()
        lane.srv.stop()
    finally:
        daemons.stop_all()


def test_regions_need_the_local_lane(stub):
    """A gateway without --local-socket refuses spans with a clear status."""
    expect_code(lambda: stub.Compress(pb.CompressRequest(format=pb.COMPRESSION_FORMAT_GZIP,
                                                         input_region=pb.RegionSpan(region="r1-x", offset=0, length=1)),
                                      timeout=30), grpc.StatusCode.FAILED_PRECONDITION, "--local-socket")


def test_accelctl_uses_the_local_lane_for_a_unix_target(lane, tmp_path):
    """accelctl (through the Swift client library) registers shared memory and sends spans."""
    import json as _json
    from test_accelctl import ctl_binary
    data = sample(2 * MiB)
    src, packed, back = tmp_path / "in.bin", tmp_path / "out.gz", tmp_path / "back.bin"
    src.write_bytes(data)
    key = lane.tenants["alpha"].keys[0]
    target = f"unix:{lane.sock_path}"
    p = subprocess.run([ctl_binary(), "compress", "-t", target, "--api-key", key, "--format", "gzip", "--stats",
                        "-i", str(src), "-o", str(packed)], capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    assert gzip.decompress(packed.read_bytes()) == data
    assert b"job: %d B" % len(data) in p.stderr, p.stderr.decode()
    p = subprocess.run([ctl_binary(), "decompress", "-t", target, "--api-key", key, "--format", "gzip", "--one-shot",
                        "-i", str(packed), "-o", str(back)], capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    assert back.read_bytes() == data
    # encrypt, decrypt and digest keep their payloads in shared memory too: no payload crosses
    # the socket, so the gateway counts no network payload for them (--no-shared-memory does).
    keyfile = tmp_path / "k.bin"
    raw_key = os.urandom(32)
    keyfile.write_bytes(raw_key)
    sealed, opened = tmp_path / "ct.bin", tmp_path / "pt.bin"

    def network_payloads():
        return payload_jobs(lane, ("encrypt", "decrypt", "digest"))

    before = network_payloads()
    crypt = ["--api-key", key, "--algorithm", "aes-256-gcm", "--key-file", str(keyfile), "--aad", "hdr"]
    p = subprocess.run([ctl_binary(), "encrypt", "-t", target, *crypt, "-i", str(src), "-o", str(sealed)],
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    blob = sealed.read_bytes()
    assert AESGCM(raw_key).decrypt(blob[:12], blob[12:], b"hdr") == data
    p = subprocess.run([ctl_binary(), "decrypt", "-t", target, *crypt, "-i", str(sealed), "-o", str(opened)],
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    assert opened.read_bytes() == data
    bad = bytearray(blob)
    bad[-1] ^= 1
    (tmp_path / "bad.bin").write_bytes(bytes(bad))
    p = subprocess.run([ctl_binary(), "decrypt", "-t", target, *crypt, "-i", str(tmp_path / "bad.bin"),
                        "-o", str(tmp_path / "never.bin")], capture_output=True, timeout=120)
    assert p.returncode != 0 and b"authentication failed" in p.stderr, p.stderr.decode()
    p = subprocess.run([ctl_binary(), "digest", "-t", target, "--api-key", key, "--algorithm", "sha256", "-i", str(src)],
                       capture_output=True, timeout=120)
    assert p.returncode == 0 and p.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest(), p.stderr.decode()
    assert network_payloads() == before, "a crypto verb sent its payload over the socket"
    p = subprocess.run([ctl_binary(), "digest", "-t", target, "--api-key", key, "--algorithm", "sha256",
                        "--no-shared-memory", "-i", str(src)], capture_output=True, timeout=120)
    assert p.returncode == 0 and p.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest(), p.stderr.decode()
    assert network_payloads() == before + 1, "--no-shared-memory carries the payload in the message"
    # The load generator's local-lane mode works end to end (every call OK).
    out = tmp_path / "bench.json"
    p = subprocess.run([ctl_binary(), "bench", "-t", target, "--api-key", key, "-c", "2", "--duration", "1",
                        "--sizes", "64K", "--mix", "compress:1,decompress:1,encrypt:1,decrypt:1,digest:1",
                        "--json", str(out)], capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    results = _json.load(open(out))["results"]
    assert results and all(r["calls"] > 0 and not r["errors"] for r in results), results


def test_mib_messages_over_the_unix_socket_never_stall(lane):
    """Regression: grpc-swift-nio-transport 2.9.2 held a unary response's DATA
    unflushed when the socket was full at that moment, and the call hung until its
    deadline (about one call per 4 s of this load before the AccelHTTP2 fix)."""
    import threading
    key, data = os.urandom(32), os.urandom(MiB)
    failures, calls = [], [0]
    stop = time.monotonic() + 4

    def worker():
        while time.monotonic() < stop:
            try:
                r = lane.stub.Encrypt(pb.EncryptRequest(algorithm=pb.CIPHER_ALGORITHM_AES_256_GCM,
                                                        key=pb.KeySpec(raw=key), plaintext=data),
                                      metadata=lane.md("alpha"), timeout=20)
                assert len(r.ciphertext) == MiB + 16
                calls[0] += 1
            except grpc.RpcError as e:
                failures.append(f"{e.code()} {e.details()}")
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures
    assert calls[0] >= 8


def test_local_and_network_tenants_share_the_device_by_weight(start_server, tmp_path):
    """Local-lane jobs go through the same fair scheduler as network jobs: a weight-1
    tenant on the local lane and a weight-3 tenant on TCP, both saturating one engine
    capped at 40 MB/s, get 1/4 and 3/4 of the device time."""
    import re
    import threading
    import urllib.request
    tenants = {"alpha": Tenant("alpha", [new_key("alpha")], weight=1), "beta": Tenant("beta", [new_key("beta")], weight=3)}
    path = write_tenants(str(tmp_path / "tenants.yaml"), list(tenants.values()))
    sock = os.path.join(short_tmpdir("agl-"), "ag.sock")
    srv = start_server("--tenants", path, "--local-socket", sock, "--engines", 1, "--engine-cap-mbps", 40, label="fair-lanes")
    lane = Lane(srv, sock, tenants)
    data = sample(MiB)
    stop = threading.Event()
    errors = []

    def local_worker():
        ctl = lane.control("alpha")
        region = ctl.register(4 * MiB)
        region.write(0, data)
        while not stop.is_set():
            try:
                lane.stub.Compress(pb.CompressRequest(format=pb.COMPRESSION_FORMAT_GZIP, level=1,
                                                      input_region=region.span(0, MiB),
                                                      output_region=region.span(2 * MiB, 2 * MiB)),
                                   metadata=lane.md("alpha"), timeout=60)
            except grpc.RpcError as e:
                errors.append(f"local: {e.code()} {e.details()}")

    def network_worker():
        stub = srv.new_stub()
        while not stop.is_set():
            try:
                stub.Compress(pb.CompressRequest(format=pb.COMPRESSION_FORMAT_GZIP, level=1, data=data),
                              metadata=lane.md("beta"), timeout=60)
            except grpc.RpcError as e:
                errors.append(f"network: {e.code()} {e.details()}")

    def device_seconds():
        text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
        return {m.group(1): float(m.group(2))
                for m in re.finditer(r'accelgate_device_seconds_total\{tenant="([^"]+)"\} ([0-9.e+-]+)', text)}

    threads = [threading.Thread(target=local_worker) for _ in range(4)] + [threading.Thread(target=network_worker) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        before = device_seconds()
        time.sleep(5)
        after = device_seconds()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[:5]
    used = {t: after.get(t, 0) - before.get(t, 0) for t in ("alpha", "beta")}
    share = used["alpha"] / sum(used.values())
    # 1/4 within ±25 % of itself; FIFO would give the local lane about half (same number of callers).
    assert 0.1875 <= share <= 0.3125, f"local-lane tenant share {share:.3f} (device seconds {used})"
    lane.channel.close()
