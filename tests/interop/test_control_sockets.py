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


@pytest.fixture(params=["daemon"])
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

