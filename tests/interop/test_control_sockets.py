"""Hardening of the two Unix control sockets: the device daemon's (`accelgate device
--socket`, docs/DEVICE_ABI.md §10, §13) and the local lane's (`PATH.ctl`,
docs/LOCAL_LANE.md).

* Every descriptor a peer passes is closed on every path: an op before hello
  (issue finding 16), a frame cut short in its header or body, an oversize length,
  bad JSON, an unknown op, more descriptors than the op takes.
* A SOMAXCONN backlog, a frame timeout for half-sent frames, and a bound on the
  connections that have not authenticated (the oldest is closed past it), so an
  honest client is served while hundreds of connections hold partial frames.
* Socket modes are exactly 0660 whatever the umask (finding 18).
* Region spans are refused over TCP and inside Submit (finding 19).
* Local-lane quotas per tenant and per connection: regions, bytes, descriptors,
  connections, and a descriptor reserve below RLIMIT_NOFILE (finding 6).

The server's descriptors are read from /proc/PID/fd.
"""
import fcntl
import json
import os
import resource
import socket
import stat
import struct
import time
import zlib

import grpc
import pytest

from accelgate.v1 import accelerator_pb2_grpc as pb_grpc
from agtest import Tenant, new_key, pb, write_tenants
from daemonhelp import ABI_VERSION, DaemonFactory, short_tmpdir
from locallane import ControlChannel

MiB = 1 << 20


# ----------------------------------------------------------------------------------------
# Targets: a daemon or a gateway's local lane, with what a request there looks like


class Target:
    def __init__(self, kind, pid, path, key=None, proc=None):
        self.kind, self.pid, self.path, self.key, self.proc = kind, pid, path, key, proc

    def fds(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def request(self, **extra):
        """A request that needs no descriptor (and is refused before hello on the daemon)."""
        if self.kind == "daemon":
            return dict({"op": "heartbeat"}, **extra)
        return dict({"op": "unregister", "api_key": self.key, "region": "r1-nope"}, **extra)

    def fd_request(self):
        """The op that takes a descriptor."""
        if self.kind == "daemon":
            return {"op": "attach-region", "queue": 0, "region": 1, "size": 4096}
        return {"op": "register", "api_key": self.key, "size": 4096}

    def connect(self, timeout=10):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.path)
        return s

    def greet(self, s):
        if self.kind == "daemon":
            assert ask(s, {"op": "hello", "abi": ABI_VERSION})["ok"]

    def honest(self):
        """A full honest exchange on a fresh connection."""
        with self.connect() as s:
            if self.kind == "daemon":
                assert ask(s, {"op": "hello", "abi": ABI_VERSION})["ok"]
                assert ask(s, {"op": "capabilities"})["ok"]
            else:
                fd = sealed_memfd(4096)
                try:
                    r = ask(s, {"op": "register", "api_key": self.key, "size": 4096}, [fd])
                finally:
                    os.close(fd)
                assert r["ok"], r
                assert ask(s, {"op": "unregister", "api_key": self.key, "region": r["region"]})["ok"]


def frame(obj):
    body = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    return struct.pack("<I", len(body)) + body


def recv_exact(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def ask(s, obj, fds=()):
    data = frame(obj)
    if fds:
        socket.send_fds(s, [data], list(fds))
    else:
        s.sendall(data)
    (n,) = struct.unpack("<I", recv_exact(s, 4))
    return json.loads(recv_exact(s, n))


def sealed_memfd(size, seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW):
    fd = os.memfd_create("ctl-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def some_fds():
    """A memfd, both ends of a pipe and /dev/null: what a leak would keep."""
    r, w = os.pipe()
    return [sealed_memfd(4096), r, w, os.open("/dev/null", os.O_RDWR)]


def send_and_close_ours(s, data, fds):
    try:
        socket.send_fds(s, [data], fds)
    finally:
        for fd in fds:
            os.close(fd)


def wait_fds(target, at_most, within_s=8.0):
    deadline = time.monotonic() + within_s
    n = target.fds()
    while n > at_most and time.monotonic() < deadline:
        time.sleep(0.05)
        n = target.fds()
    return n


def is_closed_by_server(s, within_s):
    s.settimeout(within_s)
    try:
        return s.recv(1) == b""
    except socket.timeout:
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True


def lane_tenants(tmp_path, names=("alpha", "beta")):
    tenants = {n: Tenant(n, [new_key(n)]) for n in names}
    return tenants, write_tenants(str(tmp_path / "tenants.yaml"), list(tenants.values()))


def start_lane(start_server, tmp_path, config="", label="lane", preexec=None, flags=()):
    tenants, path = lane_tenants(tmp_path)
    sock = os.path.join(short_tmpdir("agc-"), "ag.sock")
    args = ["--tenants", path, "--local-socket", sock, *flags]
    if config:
        cfg = tmp_path / "accelgate.yaml"
        cfg.write_text(config)
        args += ["--config", str(cfg)]
    srv = start_server(*args, label=label, preexec=preexec)
    return srv, sock, tenants


@pytest.fixture
def daemons(request):
    factory = DaemonFactory(request.node.name)
    yield factory
    factory.stop_all()


@pytest.fixture(params=["daemon", "lane"])
def target(request, daemons, start_server, tmp_path):
    if request.param == "daemon":
        dev = daemons("--frame-timeout-ms", "800", "--max-unauthenticated", "16", label="ctl")
        t = Target("daemon", dev.proc.pid, dev.path, proc=dev)
    else:
        srv, sock, tenants = start_lane(start_server, tmp_path,
                                        "local:\n  frame_timeout_ms: 800\n  max_unauthenticated_connections: 16\n")
        t = Target("lane", srv.proc.pid, sock + ".ctl", key=tenants["alpha"].keys[0], proc=srv)
    t.honest()  # warms up lazily opened descriptors
    time.sleep(0.3)
    return t


# ----------------------------------------------------------------------------------------
# 1. Descriptors: closed on every path


def test_descriptors_passed_before_hello_are_closed(daemons):
    """Finding 16: attach-region before hello kept its descriptors."""
    dev = daemons(label="before-hello")
    t = Target("daemon", dev.proc.pid, dev.path)
    with t.connect() as s:
        time.sleep(0.2)
        base = t.fds()
        for _ in range(3):
            fds = some_fds()
            try:
                r = ask(s, {"op": "attach-region", "queue": 0, "region": 1, "size": 4096}, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            assert not r["ok"] and "hello" in r["error"], r
        assert wait_fds(t, base, within_s=2) == base, f"descriptors kept after ops before hello: {t.fds()} > {base}"
        # The connection stays usable.
        assert ask(s, {"op": "hello", "abi": ABI_VERSION})["ok"]


@pytest.mark.parametrize("cut", ["header", "body", "body-after-header"])
def test_descriptors_of_a_frame_cut_short_are_closed(target, cut):
    base = target.fds()
    for _ in range(4):
        s = target.connect()
        target.greet(s)
        data = frame(target.fd_request())
        if cut == "body-after-header":  # the descriptors come with the body's first bytes
            s.sendall(data[:4])
            time.sleep(0.02)
            send_and_close_ours(s, data[4:len(data) - 5], some_fds())
        else:
            send_and_close_ours(s, data[:2] if cut == "header" else data[:len(data) - 5], some_fds())
        s.close()
    got = wait_fds(target, base)
    assert got <= base, f"{target.kind}: {got - base} descriptors left open after frames cut in the {cut}"


@pytest.mark.parametrize("what", ["oversize-length", "bad-json", "unknown-op", "too-many", "other-op", "flood"])
def test_descriptors_with_bad_or_extra_frames_are_closed(target, what):
    base = target.fds()
    for _ in range(3):
        s = target.connect()
        target.greet(s)
        fds = some_fds()
        if what == "oversize-length":
            data = struct.pack("<I", 1 << 20) + b"{}"
        elif what == "bad-json":
            data = frame(b'{"op": "heartbeat",')
        elif what == "unknown-op":
            data = frame({"op": "no-such-op", "api_key": target.key})
        elif what == "too-many":
            data = frame(target.fd_request())
            fds += some_fds() + some_fds()
        elif what == "flood":
            data = frame(target.fd_request())
            fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(16)]
        else:
            data = frame(target.request())
        send_and_close_ours(s, data, fds)
        s.settimeout(5)
        try:
            s.recv(1 << 16)
        except OSError:
            pass
        s.close()
    got = wait_fds(target, base)
    assert got <= base, f"{target.kind}: {got - base} descriptors left open after {what} frames"


# ----------------------------------------------------------------------------------------
# 2. Connections: backlog, frame timeout, the unauthenticated bound


def test_a_half_sent_frame_is_closed_after_the_frame_timeout(target):
    """The connection passes its own socket with a half header: only the frame timeout
    can end it (the server holds the peer's end, so it never sees EOF)."""
    base = target.fds()
    s = target.connect()
    target.greet(s)
    socket.send_fds(s, [b"\x10\x00"], [s.fileno()])
    t0 = time.monotonic()
    assert is_closed_by_server(s, 5.0), f"{target.kind}: a half-sent frame was not timed out within 5 s"
    took = time.monotonic() - t0
    assert took >= 0.6, f"closed after {took:.2f} s, before the 800 ms frame timeout"
    s.close()
    assert wait_fds(target, base) <= base


def test_hundreds_of_connections_never_keep_an_honest_client_out(target):
    """300 connections at once (no EAGAIN: the backlog is SOMAXCONN), 250 of them holding
    partial frames; the honest client is served at once, and the unauthenticated ones
    past the bound (16 here) are closed oldest first."""
    conns = []
    try:
        for i in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)  # connect fails with EAGAIN at once if the backlog is full
            s.connect(target.path)
            conns.append(s)
            if i < 250:
                s.send(frame(target.request())[: 1 + i % 20])
        t0 = time.monotonic()
        target.honest()
        assert time.monotonic() - t0 < 5, "the honest client waited"
        time.sleep(0.3)
        closed = sum(1 for s in conns if is_closed_by_server(s, 0.01))
        assert closed >= 300 - 16 - 5, f"only {closed} of 300 unauthenticated connections were closed"
    finally:
        for s in conns:
            s.close()


def test_unauthenticated_connections_past_the_bound_close_the_oldest(target):
    idle = [target.connect() for _ in range(20)]
    try:
        time.sleep(0.5)
        closed = [is_closed_by_server(s, 0.2) for s in idle]
        assert all(closed[:4]) and not any(closed[4:]), f"closed: {closed}"
        # Authenticated connections are never closed for it.
        kept = target.connect()
        target.greet(kept) if target.kind == "daemon" else ask(kept, target.request())
        more = [target.connect() for _ in range(20)]
        time.sleep(0.5)
        assert not is_closed_by_server(kept, 0.2), "an authenticated connection was closed"
        target.honest()
        for s in more:
            s.close()
        kept.close()
    finally:
        for s in idle:
            s.close()


# ----------------------------------------------------------------------------------------
# 3. Socket modes (finding 18)


@pytest.mark.parametrize("umask", [0o077, 0o000, 0o027])
def test_local_sockets_are_0660_whatever_the_umask(start_server, tmp_path, umask):
    srv, sock, tenants = start_lane(start_server, tmp_path, label=f"umask{umask:o}",
                                    preexec=lambda: os.umask(umask))
    for path in (sock, sock + ".ctl"):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode), path
        assert stat.S_IMODE(st.st_mode) == 0o660, f"{path}: mode {stat.S_IMODE(st.st_mode):#o} under umask {umask:#o}"
    assert [n for n in os.listdir(os.path.dirname(sock)) if n.startswith(".ag")] == [], "staging directory left behind"
    ch = grpc.insecure_channel(f"unix:{sock}")
    r = pb_grpc.AcceleratorStub(ch).Compress(pb.CompressRequest(format=pb.COMPRESSION_FORMAT_ZLIB, data=b"x" * 100),
                                             metadata=tenants["alpha"].md, timeout=30)
    assert zlib.decompress(r.data) == b"x" * 100
    ch.close()


@pytest.mark.parametrize("umask", [0o077, 0o000])
def test_daemon_socket_is_0660_whatever_the_umask(daemons, umask):
    dev = daemons(label=f"umask{umask:o}", umask=umask)
    assert stat.S_IMODE(os.stat(dev.path).st_mode) == 0o660


# ----------------------------------------------------------------------------------------
# 4. Spans only on the local socket's unary calls (finding 19)


def test_region_spans_are_refused_over_tcp_and_inside_submit(start_server, tmp_path):
    srv, sock, tenants = start_lane(start_server, tmp_path)
    md = tenants["alpha"].md
    ctl = ControlChannel(sock + ".ctl", api_key=tenants["alpha"].keys[0])
    region = ctl.register(MiB)
    region.write(0, b"region bytes " * 100)
    span, out = region.span(0, 1300), region.span(512 * 1024, 256 * 1024)
    key = pb.KeySpec(raw=os.urandom(32))
    tcp = srv.stub()
    calls = {
        "compress": lambda st: st.Compress(pb.CompressRequest(format=pb.COMPRESSION_FORMAT_ZLIB, input_region=span),
                                           metadata=md, timeout=30),
        "decompress": lambda st: st.Decompress(pb.DecompressRequest(format=pb.COMPRESSION_FORMAT_ZLIB,
                                                                    data=zlib.compress(b"x"), output_region=out),
                                               metadata=md, timeout=30),
        "encrypt": lambda st: st.Encrypt(pb.EncryptRequest(algorithm=pb.CIPHER_ALGORITHM_AES_256_GCM, key=key,
                                                           input_region=span), metadata=md, timeout=30),
        "digest": lambda st: st.Digest(pb.DigestRequest(algorithm=pb.DIGEST_ALGORITHM_SHA256, input_region=span),
                                       metadata=md, timeout=30),
    }
    for name, fn in calls.items():
        with pytest.raises(grpc.RpcError) as e:
            fn(tcp)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{name} over TCP: {e.value.code()}"
        assert "only on the local socket" in e.value.details(), e.value.details()
    # The same calls on the local socket work.
    ch = grpc.insecure_channel(f"unix:{sock}")
    local = pb_grpc.AcceleratorStub(ch)
    assert zlib.decompress(calls["compress"](local).data) == b"region bytes " * 100
    assert calls["digest"](local).digest
    # Inside Submit (on the local socket too): every kind of job naming a span is refused.
    items = [pb.SubmitRequest(id="compress", compress=pb.CompressRequest(format=pb.COMPRESSION_FORMAT_ZLIB,
                                                                         input_region=span)),
             pb.SubmitRequest(id="encrypt", encrypt=pb.EncryptRequest(algorithm=pb.CIPHER_ALGORITHM_AES_256_GCM,
                                                                      key=key, input_region=span)),
             pb.SubmitRequest(id="decrypt", decrypt=pb.DecryptRequest(algorithm=pb.CIPHER_ALGORITHM_AES_256_GCM,
                                                                      key=key, input_region=span)),
             pb.SubmitRequest(id="digest", digest=pb.DigestRequest(algorithm=pb.DIGEST_ALGORITHM_SHA256,
                                                                   input_region=span)),
             pb.SubmitRequest(id="plain", compress=pb.CompressRequest(format=pb.COMPRESSION_FORMAT_ZLIB, data=b"ok"))]
    for stub in (local, tcp):
        got = {r.id: r for r in stub.Submit(iter(items), metadata=md, timeout=30)}
        for i in ("compress", "encrypt", "decrypt", "digest"):
            assert got[i].code == grpc.StatusCode.INVALID_ARGUMENT.value[0], f"Submit {i}: {got[i]}"
            assert "unary calls" in got[i].message, got[i].message
        assert got["plain"].code == 0 and zlib.decompress(got["plain"].compress.data) == b"ok"
    ch.close()
    ctl.close()


# ----------------------------------------------------------------------------------------
# 5. Quotas (finding 6)


def register(s, key, size, seal=True):
    fd = sealed_memfd(size) if seal else None
    try:
        return ask(s, {"op": "register", "api_key": key, "size": size}, [fd])
    finally:
        os.close(fd)


def test_region_count_quotas_per_connection_and_per_tenant(start_server, tmp_path):
    srv, sock, tenants = start_lane(start_server, tmp_path,
                                    "local:\n  connection_max_regions: 2\n  tenant_max_regions: 3\n")
    alpha, beta = tenants["alpha"].keys[0], tenants["beta"].keys[0]
    a1, a2, b1 = (socket.socket(socket.AF_UNIX) for _ in range(3))
    for s in (a1, a2, b1):
        s.settimeout(10)
        s.connect(sock + ".ctl")
    assert register(a1, alpha, 4096)["ok"] and register(a1, alpha, 4096)["ok"]
    r = register(a1, alpha, 4096)
    assert not r["ok"] and r["quota"] == "local.connection_max_regions", r
    assert register(a2, alpha, 4096)["ok"]
    r = register(a2, alpha, 4096)
    assert not r["ok"] and r["quota"] == "local.tenant_max_regions", r
    # Another tenant is untouched.
    assert register(b1, beta, 4096)["ok"] and register(b1, beta, 4096)["ok"]
    # Closing a connection gives its regions (and its quota) back.
    a1.close()
    deadline = time.monotonic() + 5
    while True:
        r = register(a2, alpha, 4096)
        if r["ok"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert r["ok"], r
    a2.close()
    b1.close()


def test_byte_and_descriptor_quotas(start_server, tmp_path):
    # Two queues: a region costs 1 + 2 descriptors.
    srv, sock, tenants = start_lane(start_server, tmp_path,
                                    "local:\n  tenant_max_region_bytes: 1048576\n  connection_max_region_bytes: 786432\n"
                                    "  tenant_max_descriptors: 7\n", flags=("--queues", "2"))
    alpha, beta = tenants["alpha"].keys[0], tenants["beta"].keys[0]
    with socket.socket(socket.AF_UNIX) as a1, socket.socket(socket.AF_UNIX) as a2, socket.socket(socket.AF_UNIX) as b:
        for s in (a1, a2, b):
            s.settimeout(10)
            s.connect(sock + ".ctl")
        assert register(a1, alpha, 512 * 1024)["ok"]
        r = register(a1, alpha, 512 * 1024)
        assert not r["ok"] and r["quota"] == "local.connection_max_region_bytes", r
        assert register(a2, alpha, 256 * 1024)["ok"]  # 768 KiB of 1 MiB, 6 of 7 descriptors
        r = register(a2, alpha, 512 * 1024)
        assert not r["ok"] and r["quota"] == "local.tenant_max_region_bytes", r
        r = register(a2, alpha, 4096)
        assert not r["ok"] and r["quota"] == "local.tenant_max_descriptors", r
        assert register(b, beta, 700 * 1024)["ok"] and register(b, beta, 4096)["ok"]


def test_control_connections_per_tenant_are_bounded(start_server, tmp_path):
    srv, sock, tenants = start_lane(start_server, tmp_path, "local:\n  tenant_max_connections: 2\n")
    alpha, beta = tenants["alpha"].keys[0], tenants["beta"].keys[0]
    conns = [socket.socket(socket.AF_UNIX) for _ in range(4)]
    try:
        for s in conns:
            s.settimeout(10)
            s.connect(sock + ".ctl")
        bad = {"op": "unregister", "region": "r1-x"}
        assert ask(conns[0], dict(bad, api_key=alpha))["error"].startswith("no region")
        assert ask(conns[1], dict(bad, api_key=alpha))["error"].startswith("no region")
        r = ask(conns[2], dict(bad, api_key=alpha))
        assert r["quota"] == "local.tenant_max_connections", r
        assert is_closed_by_server(conns[2], 2)
        # A connection belongs to one tenant; another tenant's key is refused on it.
        r = ask(conns[0], dict(bad, api_key=beta))
        assert "another tenant" in r["error"], r
        assert ask(conns[3], dict(bad, api_key=beta))["error"].startswith("no region")
        conns[0].close()
        time.sleep(0.3)
        with socket.socket(socket.AF_UNIX) as again:
            again.settimeout(10)
            again.connect(sock + ".ctl")
            assert ask(again, dict(bad, api_key=alpha))["error"].startswith("no region")
    finally:
        for s in conns:
            s.close()


def test_the_descriptor_reserve_keeps_grpc_and_control_accepts_working(start_server, tmp_path):
    """With RLIMIT_NOFILE at 400 and a reserve of 150, a tenant registering regions until
    refused never brings the gateway to EMFILE: new gRPC connections (TCP and Unix) and
    new control connections are still accepted and served."""
    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))
    srv, sock, tenants = start_lane(start_server, tmp_path, "local:\n  descriptor_reserve: 150\n", preexec=low_limit)
    alpha, beta = tenants["alpha"].keys[0], tenants["beta"].keys[0]
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock + ".ctl")
        for i in range(400):
            r = register(s, alpha, 4096)
            if not r["ok"]:
                break
        assert r.get("quota") == "local.descriptor_reserve", r
        open_now = len(os.listdir(f"/proc/{srv.proc.pid}/fd"))
        assert 400 - open_now >= 140, f"{open_now} of 400 descriptors open"
        # gRPC over TCP and over the Unix socket, on new connections.
        for target in (srv.address, f"unix:{sock}"):
            ch = grpc.insecure_channel(target)
            r2 = pb_grpc.AcceleratorStub(ch).Compress(
                pb.CompressRequest(format=pb.COMPRESSION_FORMAT_ZLIB, data=b"still"), metadata=tenants["beta"].md,
                timeout=30)
            assert zlib.decompress(r2.data) == b"still"
            ch.close()
        with socket.socket(socket.AF_UNIX) as b:
            b.settimeout(10)
            b.connect(sock + ".ctl")
            r3 = register(b, beta, 4096)
            assert r3.get("quota") == "local.descriptor_reserve", r3
            assert ask(b, {"op": "unregister", "api_key": beta, "region": "r1-x"})["error"].startswith("no region")
