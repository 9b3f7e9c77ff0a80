#!/usr/bin/env python3
"""Fuzzer for AccelGate's two Unix control sockets.

* daemon: `accelgate device --socket PATH`, the standalone device's control channel
  (docs/DEVICE_ABI.md §10, §13: hello, capabilities, alloc, release, heartbeat,
  status, inject, lift-isolation, attach-region, detach-region).
* lane:   `accelgate serve --local-socket PATH` with a tenants file, the gateway's
  local-lane control socket PATH.ctl (docs/LOCAL_LANE.md: register, unregister),
  plus gRPC calls naming spans of the registered regions.

Both sockets speak the same framing: a little-endian u32 length and a JSON object of
at most 64 KiB, descriptors passed with SCM_RIGHTS on the same sendmsg.

A *case* is a list of JSON steps (connect, send, recv, close, grpc, honest, ...),
produced by a seeded generator and run by one interpreter, so what was sent can be
written out as JSON lines and replayed exactly (`--replay FILE`). After every batch
of cases the oracles run: the process is alive, an honest client is served, and the
process's descriptors, threads, queues and mappings come back to their baseline once
the fuzz connections are closed. Per-reply oracles check the protocol and its rules
(no op accepted before hello, no foreign queue released, no bad region accepted, no
other tenant's region usable, no reply over 64 KiB, no hang on a complete frame).

Run `control_fuzz.py --help`; fuzz/control/README.md explains coverage and replay.
"""
import argparse
import array
import collections
import fcntl
import hashlib
import json
import mmap
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_BINARY = os.path.join(ROOT, ".build", "debug", "accelgate")
FINDINGS_DIR = os.path.join(HERE, "findings")
STUBS_DIR = os.path.join(HERE, ".stubs")


def _abi_version() -> int:
    text = open(os.path.join(ROOT, "Sources", "CAccelABI", "include", "accel_abi.h")).read()
    major = int(re.search(r"#define ACCEL_ABI_VERSION_MAJOR\s+(\d+)u", text).group(1))
    minor = int(re.search(r"#define ACCEL_ABI_VERSION_MINOR\s+(\d+)u", text).group(1))
    return (major << 16) | minor


ABI = _abi_version()
MAX_FRAME = 64 * 1024          # both sockets: largest JSON object
SCM_MAX_FD = 253               # Linux: most descriptors in one SCM_RIGHTS message
EXT_REGION_MAX = 4096          # region ids 1...4096
MAX_REGION = 16 << 30          # largest region a client may register or attach
HANG_S = 5.0                   # a complete frame must be answered (or the connection closed) within this
FRAME_TIMEOUT_MS = 1000        # the targets are started with this frame timeout (default 5000)
HOLD_S = FRAME_TIMEOUT_MS / 1000 + 0.7  # how long a half-sent frame may hold what came with it
IO_S = 10.0                    # honest client's socket and RPC timeouts
MAX_QUEUES = 128
U32, U64 = (1 << 32) - 1, (1 << 64) - 1
MISSING_QUEUE = 4_000_000_000  # what "$q3" becomes when the connection owns no 4th queue
F_SEAL_FUTURE_WRITE = 0x0010

# Fixed API keys (local test keys): a reproducer replays against a fresh gateway.
KEYS = {"alpha": "cfz-alpha-6d1c8e0b4f2a9d37", "beta": "cfz-beta-0a93f27c5be1d846",
        "honest": "cfz-honest-71b5e2d09c4fa3e8"}
TENANT_OF_KEY = {v: k for k, v in KEYS.items()}
PATTERN = bytes((i * 131 + (i >> 8) * 7 + 11) & 0xFF for i in range(1 << 16))  # first 64 KiB of fuzz memfds

SEALS = {
    "none": 0,
    "shrink": fcntl.F_SEAL_SHRINK,
    "shrink+grow": fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW,
    "all": fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
    "grow": fcntl.F_SEAL_GROW,
    "write": fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE,
    "future-write": fcntl.F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE,
}


# ======================================================================================
# Step constructors (what generators emit; what reproducers contain)

def connect(c, **kw):
    return {"op": "connect", "c": c, **kw}


def send_json(c, obj, **kw):
    """A framed JSON object (symbols like "$q0", "$r0@1", "$key:alpha" are resolved when run)."""
    return {"op": "send", "c": c, "body": {"json": obj}, **kw}


def send_text(c, text, **kw):
    """A framed body given as text (raw JSON tokens, symbols substituted textually)."""
    return {"op": "send", "c": c, "body": {"text": text}, **kw}


def send_raw(c, data: bytes, **kw):
    """Bytes as they are, no length prefix added."""
    return {"op": "send", "c": c, "raw": {"hex": data.hex()}, **kw}


def recv(c):
    return {"op": "recv", "c": c}


def close(c):
    return {"op": "close", "c": c}


def memfd(size, seals="shrink+grow", file_size=None, after=None, ro=False, count=1):
    """A memfd of file_size (default size) bytes; `after` acts on it once passed."""
    d = {"kind": "memfd", "size": size, "seals": seals}
    if file_size is not None:
        d["file_size"] = file_size
    if after:
        d["after"] = after
    if ro:
        d["ro"] = True
    if count != 1:
        d["count"] = count
    return d


def fdk(kind, count=1):
    return {"kind": kind, "count": count} if count != 1 else {"kind": kind}


OTHER_FD_KINDS = ["pipe_r", "pipe_w", "devnull", "dir", "socket", "self", "eventfd", "tmpfile", "epoll"]


class Case:
    def __init__(self, name, steps, tag=""):
        self.name, self.steps, self.tag = name, steps, tag

    def to_lines(self, index):
        yield {"case": index, "name": self.name, "tag": self.tag}
        for s in self.steps:
            yield {"case": index, "step": s}


# ======================================================================================
# Descriptors to pass

def make_fds(specs, conn_sock, workdir):
    """Creates the descriptors `specs` name. Returns (fds, infos, after): `infos` says what
    each one is (for the semantic oracles), `after` are actions to run once they are sent."""
    fds, infos, after = [], [], []
    for spec in specs or []:
        for _ in range(int(spec.get("count", 1))):
            kind = spec["kind"]
            info = {"kind": kind}
            if kind == "memfd":
                size = int(spec["size"])
                file_size = int(spec.get("file_size", size))
                fd = os.memfd_create(f"cfz-{spec.get('seals', 'none')}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                os.ftruncate(fd, file_size)
                if file_size:
                    os.pwrite(fd, PATTERN[:min(file_size, len(PATTERN))], 0)
                seals = SEALS[spec.get("seals", "none")]
                if seals:
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
                info.update(file_size=file_size, seals=seals)
                if spec.get("ro"):
                    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
                    os.close(fd)
                    fd = ro
                    info["ro"] = True
                act = spec.get("after")
                if act:
                    after.append((act, fd))
                    if act == "grow" and not seals & fcntl.F_SEAL_GROW:
                        # Grown by 1 MiB just after the send, maybe before the server looks:
                        # either size is right, so the oracle may count on neither.
                        info["may_grow_to"] = file_size + (1 << 20)
            elif kind == "pipe_r" or kind == "pipe_w":
                r, w = os.pipe()
                keep, drop = (r, w) if kind == "pipe_r" else (w, r)
                os.close(drop)
                fd = keep
            elif kind == "devnull":
                fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
            elif kind == "dir":
                fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            elif kind == "socket":
                a, b = socket.socketpair()
                fd = a.detach()
                b.close()
            elif kind == "self":      # this very connection, passed over itself
                fd = os.dup(conn_sock.fileno())
            elif kind == "eventfd":
                fd = os.eventfd(0, os.EFD_CLOEXEC)
            elif kind == "epoll":
                ep = select.epoll()
                fd = os.dup(ep.fileno())
                ep.close()
            elif kind == "tmpfile":
                fd = os.open(os.path.join(workdir, "tmpfile"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                os.ftruncate(fd, 1 << 20)
                info["file_size"] = 1 << 20
            else:
                raise ValueError(f"unknown fd kind {kind}")
            fds.append(fd)
            infos.append(info)
    return fds, infos, after


def run_after(actions):
    for act, fd in actions:
        try:
            if act == "shrink":
                os.ftruncate(fd, 0)
            elif act == "grow":
                os.ftruncate(fd, os.fstat(fd).st_size + (1 << 20))
        except OSError:
            pass  # sealed: that is the point


# ======================================================================================
# One control connection as the fuzzer sees it

class Conn:
    def __init__(self, sock):
        self.sock = sock
        self.parse = bytearray()  # what we sent and the server has not yet seen as a whole frame
        self.pending = collections.deque()  # one entry per complete frame sent: what it was
        self.doomed = False      # we sent a length the server must refuse: it closes
        self.eof = False
        self.broken = False      # a send failed (the server closed)
        self.rbuf = bytearray()
        self.rfds = []
        self.greeted = False
        self.replies = 0         # replies read on this connection
        self.queues = []         # daemon: queues this connection allocated and still owns
        self.regions = []        # lane: regions this connection registered: dicts
        self.last_info = None

    def account(self, data, info):
        """Splits what we sent into frames, the way the server will read them."""
        if self.doomed:
            return
        self.parse += data
        while len(self.parse) >= 4:
            (n,) = struct.unpack_from("<I", self.parse)
            if n == 0 or n > MAX_FRAME:
                self.pending.append({"refused_length": n})
                self.doomed = True
                self.parse.clear()
                return
            if len(self.parse) < 4 + n:
                return
            body = bytes(self.parse[4:4 + n])
            del self.parse[:4 + n]
            try:
                req = json.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                req = None
            entry = {"req": req if isinstance(req, dict) else None}
            if info is not None:
                entry["fds"] = info
                info = None
            self.pending.append(entry)

    def _fill(self, need, deadline):
        """Reads until rbuf holds `need` bytes, never past them: the kernel hands
        SCM_RIGHTS descriptors to the recvmsg that reads the first byte of the
        sendmsg that carried them, and one recvmsg may glue several replies
        together, so reading past the current frame would give the next reply's
        descriptors to this one (or this one's to the previous)."""
        while len(self.rbuf) < need:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                return "timeout"
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(need - len(self.rbuf), socket.CMSG_SPACE(64 * 4))
            except (ConnectionResetError, BrokenPipeError):
                return "eof"
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(cdata[:len(cdata) - len(cdata) % a.itemsize])
                    self.rfds.extend(a)
            if not data:
                return "eof"
            self.rbuf += data
        return "ok"

    def read_frame(self, deadline):
        """('reply', length, body, fds) | ('eof',) | ('timeout',) | ('garbage', why)."""
        st = self._fill(4, deadline)
        if st != "ok":
            return (st,)
        (n,) = struct.unpack_from("<I", self.rbuf)
        if n == 0 or n > (16 << 20):
            return ("garbage", f"reply frame length {n}")
        st = self._fill(4 + n, deadline)
        if st != "ok":
            return ("garbage", f"reply cut short ({st}) after {len(self.rbuf) - 4} of {n} bytes")
        body = bytes(self.rbuf[4:4 + n])
        del self.rbuf[:4 + n]
        fds, self.rfds = self.rfds, []
        return ("reply", n, body, fds)

    def close(self):
        for fd in self.rfds:
            _close(fd)
        self.rfds = []
        try:
            self.sock.close()
        except OSError:
            pass


def _close(fd):
    try:
        os.close(fd)
    except OSError:
        pass


def connect_as(path, uid):
    """Connects to path from a child process running as `uid` (group root, so the
    0660 socket lets it in), and hands the connected socket back: SO_PEERCRED then
    names that uid."""
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            parent.close()
            os.setgroups([])
            os.setresgid(0, 0, 0)
            os.setresuid(uid, uid, uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            socket.send_fds(child, [b"x"], [s.fileno()])
            code = 0
        finally:
            os._exit(code)
    child.close()
    try:
        parent.settimeout(IO_S)
        _msg, fds, _flags, _addr = socket.recv_fds(parent, 1, 1)
    finally:
        parent.close()
        os.waitpid(pid, 0)
    if not fds:
        raise OSError("child could not connect")
    return socket.socket(fileno=fds[0])


# ======================================================================================
# Running a case

SYMBOL = re.compile(r"\$(q|r)(\d+)(?:@(\d+))?|\$key:(\w+)")


class Issue:
    def __init__(self, kind, detail):
        self.kind, self.detail = kind, detail


class Runner:
    """Interprets the steps of a case against a target, and checks every reply."""

    def __init__(self, target, stats):
        self.target, self.stats = target, stats

    # -- symbols ------------------------------------------------------------------

    def _symbol(self, m, conns, cur, as_text):
        if m.group(4):
            return KEYS.get(m.group(4), "cfz-unknown-key")
        which, idx = m.group(1), int(m.group(2))
        owner = conns.get(int(m.group(3)) if m.group(3) is not None else cur)
        if which == "q":
            qs = owner.queues if owner else []
            v = qs[idx] if idx < len(qs) else MISSING_QUEUE
            return str(v) if as_text else v
        rs = owner.regions if owner else []
        return rs[idx]["token"] if idx < len(rs) else "r1-00000000000000000000000000000000"

    def _resolve(self, obj, conns, cur):
        if isinstance(obj, str):
            m = SYMBOL.fullmatch(obj)
            return self._symbol(m, conns, cur, False) if m else obj
        if isinstance(obj, list):
            return [self._resolve(x, conns, cur) for x in obj]
        if isinstance(obj, dict):
            return {k: self._resolve(v, conns, cur) for k, v in obj.items()}
        return obj

    def _bytes(self, spec, conns, cur):
        if "json" in spec:
            return json.dumps(self._resolve(spec["json"], conns, cur), separators=(",", ":")).encode()
        if "text" in spec:
            t = SYMBOL.sub(lambda m: str(self._symbol(m, conns, cur, True)), spec["text"])
            return t.encode("utf-8", "surrogatepass")
        if "hex" in spec:
            return bytes.fromhex(spec["hex"])
        if "fill" in spec:
            return bytes([spec["fill"]]) * int(spec["n"])
        if "rand" in spec:
            return random.Random(spec["rand"]).randbytes(int(spec["n"]))
        return b""

    # -- the case -------------------------------------------------------------------

    def run(self, case):
        conns, issues, calls = {}, [], []
        tokens = {}  # lane: token -> tenant, for every region registered in this case
        try:
            for step in case.steps:
                self._step(step, conns, issues, calls, tokens)
                if not self.target.alive():
                    break
        finally:
            for t in calls:
                t.join(30)
            for c in conns.values():
                c.close()
        for t in calls:
            issues.extend(t.issues)
        self.stats["cases"] += 1
        return issues

    def _step(self, step, conns, issues, calls, tokens):
        op = step["op"]
        c = step.get("c", 0)
        if op == "connect":
            if c in conns:
                conns.pop(c).close()
            try:
                if step.get("uid") is not None:
                    sock = connect_as(self.target.control_path, int(step["uid"]))
                else:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.settimeout(IO_S)
                    sock.connect(self.target.control_path)
                sock.setblocking(True)
                sock.settimeout(None)
                conns[c] = Conn(sock)
                self.stats["connections"] += 1
            except OSError as e:
                self.stats["connect_errors"] += 1
                if not self.target.alive():
                    return
                issues.append(Issue("connect-refused", f"connect to {self.target.control_path}: {e}"))
        elif op == "send":
            conn = conns.get(c)
            if conn is None or conn.broken:
                return
            self._send(step, conn, conns, c)
        elif op == "recv":
            conn = conns.get(c)
            if conn is not None:
                self._drain(conn, c, issues, tokens)
        elif op == "close":
            conn = conns.pop(c, None)
            if conn is not None:
                conn.close()
        elif op == "shutdown":
            conn = conns.get(c)
            if conn is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        elif op == "sleep":
            time.sleep(float(step["s"]))
        elif op == "honest":
            ok, why = self.target.honest()
            self.stats["honest_checks"] += 1
            if not ok and self.target.alive():
                issues.append(Issue("honest-refused", f"while {len(conns)} fuzz connection(s) were open: {why}"))
        elif op == "grpc":
            t = SpanCall(self.target, self._resolve(step, conns, c), tokens, self._region_info(conns))
            self.stats["grpc_calls"] += 1
            if step.get("async"):
                t.start()
                calls.append(t)
            else:
                t.run()
                issues.extend(t.issues)
        elif op == "join":
            for t in calls:
                t.join(30)
        else:
            raise ValueError(f"unknown step {op}")

    @staticmethod
    def _region_info(conns):
        return {r["token"]: r for conn in conns.values() for r in conn.regions}

    def _send(self, step, conn, conns, c):
        if "raw" in step:
            data = self._bytes(step["raw"], conns, c)
        else:
            body = self._bytes(step.get("body", {}), conns, c)
            n = len(body) if step.get("len") is None else int(step["len"]) & U32
            data = struct.pack("<I", n) + body
        if step.get("cut") is not None:
            data = data[:int(step["cut"])]
        fds, infos, after = make_fds(step.get("fds"), conn.sock, self.target.workdir)
        chunks = max(1, int(step.get("chunks", 1)))
        fds_at = min(int(step.get("fds_at", 0)), chunks - 1)
        size = max(1, -(-len(data) // chunks)) if data else 0
        pieces = [data[i:i + size] for i in range(0, len(data), size)] if data else [b""]
        gap = float(step.get("gap", 0))
        try:
            for i, piece in enumerate(pieces):
                if i and gap:
                    time.sleep(gap)
                if i == fds_at and fds and piece:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    sent = conn.sock.sendmsg([piece], anc)
                    self.stats["fds_passed"] += len(fds)
                    run_after(after)
                    conn.account(piece[:sent], infos)
                    if sent < len(piece):
                        conn.sock.sendall(piece[sent:])
                        conn.account(piece[sent:], None)
                elif piece:
                    conn.sock.sendall(piece)
                    conn.account(piece, infos if (fds and i >= fds_at) else None)
                self.stats["bytes_sent"] += len(piece)
        except OSError:
            conn.broken = True  # the server closed: expected after a refused frame
            self.stats["send_errors"] += 1
        finally:
            for fd in fds:
                _close(fd)
        self.stats["messages"] += 1

    def _drain(self, conn, c, issues, tokens):
        """Reads one reply per complete frame sent (or the server's close)."""
        while conn.pending and not conn.eof:
            entry = conn.pending[0]
            got = conn.read_frame(time.monotonic() + HANG_S)
            if got[0] == "timeout":
                if self.target.alive():
                    what = entry.get("req") if entry.get("req") is not None else entry
                    issues.append(Issue("hang", f"connection {c}: no reply and no close within {HANG_S:.0f} s "
                                                f"of a complete frame {_short(what)}"))
                conn.pending.clear()
                return
            if got[0] == "eof":
                conn.eof = True
                self.stats["server_closes"] += 1
                return
            if got[0] == "garbage":
                issues.append(Issue("bad-reply", f"connection {c}: {got[1]}"))
                conn.eof = True
                return
            conn.pending.popleft()
            _, n, body, fds = got
            self.stats["replies"] += 1
            conn.replies += 1
            try:
                self._check_reply(conn, c, entry, n, body, fds, issues, tokens)
            finally:
                for fd in fds:
                    _close(fd)
        if not conn.pending and not conn.eof:
            # Nothing owed: anything that arrives anyway is unsolicited, except a
            # refusal on accept (DEVICE_ABI.md §10: a disallowed user gets one
            # {"ok":false} frame, then the close), which can arrive before the
            # request it answers was even sent (that send then failed).
            got = conn.read_frame(time.monotonic() + 0.01)
            if got[0] == "reply":
                for fd in got[3]:
                    _close(fd)
                if not (conn.replies == 0 and self._is_refusal_then_close(conn, got[2])):
                    issues.append(Issue("bad-reply", f"connection {c}: unsolicited reply {_short(got[2])}"))
            elif got[0] == "eof":
                conn.eof = True

    def _is_refusal_then_close(self, conn, body):
        try:
            reply = json.loads(body)
        except ValueError:
            return False
        if not (isinstance(reply, dict) and reply.get("ok") is False and isinstance(reply.get("error"), str)):
            return False
        got = conn.read_frame(time.monotonic() + HANG_S)
        if got[0] == "eof":
            conn.eof = True
            self.stats["server_closes"] += 1
            return True
        if got[0] == "reply":
            for fd in got[3]:
                _close(fd)
        return False

    def _check_reply(self, conn, c, entry, n, body, fds, issues, tokens):
        try:
            reply = json.loads(body)
        except ValueError:
            issues.append(Issue("bad-reply", f"connection {c}: reply is not JSON: {_short(body)}"))
            return
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            issues.append(Issue("bad-reply", f"connection {c}: reply is not an object with a boolean ok: "
                                             f"{_short(reply)}"))
            return
        req = entry.get("req") or {}
        if n > MAX_FRAME:
            issues.append(Issue("oversized-reply", f"connection {c}: a {n}-byte reply, over the protocol's "
                                                   f"{MAX_FRAME}-byte frame limit, to {_short(req)}"))
        self.target.check_reply(self, conn, c, req, entry.get("fds") or [], reply, fds, issues, tokens)


def _short(x, n=300):
    s = x if isinstance(x, str) else (x.decode(errors="replace") if isinstance(x, bytes) else json.dumps(x))
    return s if len(s) <= n else s[:n] + f"... ({len(s)} chars)"


class SpanCall(threading.Thread):
    """A lane gRPC call naming region spans; checks the status against LOCAL_LANE.md."""

    ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "FAILED_PRECONDITION",
               "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "OUT_OF_RANGE", "CANCELLED"}

    def __init__(self, target, step, tokens, regions):
        super().__init__(daemon=True)
        # Owners as the call starts: an async call may be bound before an
        # unregister sent after it removes the token from the shared table.
        self.target, self.step, self.tokens, self.regions = target, step, dict(tokens), regions
        self.issues = []

    def run(self):
        import grpc
        pb = self.target.pb
        s = self.step
        tenant = s.get("tenant", "alpha")
        md = (("authorization", f"Bearer {KEYS[tenant]}"),) if tenant in KEYS else (
            (("authorization", "Bearer cfz-wrong-key"),) if tenant == "badkey" else ())

        def span(d):
            return pb.RegionSpan(region=str(d.get("region", "")), offset=int(d.get("offset", 0)) & U64,
                                 length=int(d.get("length", 0)) & U64) if d else None

        inp, out = span(s.get("in")), span(s.get("out"))
        try:
            if s.get("call") == "digest":
                r = self.target.stub.Digest(pb.DigestRequest(algorithm=pb.DIGEST_ALGORITHM_SHA256, input_region=inp),
                                            metadata=md, timeout=15)
            else:
                kw = {"format": pb.COMPRESSION_FORMAT_ZLIB, "level": 1}
                if inp is not None:
                    kw["input_region"] = inp
                if out is not None:
                    kw["output_region"] = out
                r = self.target.stub.Compress(pb.CompressRequest(**kw), metadata=md, timeout=15)
            code, details = "OK", ""
        except grpc.RpcError as e:
            code, details, r = e.code().name, e.details() or "", None
        self.target.stats_grpc[code] += 1
        what = f"{s.get('call', 'compress')} as {tenant} in={s.get('in')} out={s.get('out')}"
        if code == "DEADLINE_EXCEEDED":
            self.issues.append(Issue("hang", f"gRPC {what}: no answer within 15 s"))
        elif code not in self.ALLOWED:
            self.issues.append(Issue("grpc-status", f"gRPC {what}: {code} {details!r}"))
        if code != "OK":
            return
        sent = (inp,) if s.get("call") == "digest" else (inp, out)  # a DigestRequest has no output span
        owner = [self.tokens.get(sp.region) for sp in sent if sp is not None]
        if any(o != tenant for o in owner):
            self.issues.append(Issue("cross-tenant-span", f"gRPC {what} succeeded on a region of {owner}"))
        region = self.regions.get(inp.region) if inp is not None else None
        if s.get("call") != "digest" and out is None and region is not None:
            want = region_content(region, inp.offset, inp.length)
            try:
                got = zlib.decompress(r.data)
            except zlib.error as e:
                got = f"undecodable ({e})"
            if got != want:
                self.issues.append(Issue("wrong-output", f"gRPC {what}: output does not decompress to the span's "
                                                         f"{len(want)} bytes"))


def region_content(region, offset, length):
    """What a fuzz memfd holds at [offset, offset+length): PATTERN, then zeros."""
    known = min(region["file_size"], len(PATTERN))
    head = PATTERN[offset:min(offset + length, known)] if offset < known else b""
    return head + b"\0" * (length - len(head))


# ======================================================================================
# Targets: the processes under test, their honest clients and their reply rules

def proc_snapshot(pid):
    """Descriptors (and what they are), threads, VmSize (KiB) and mappings of a process."""
    fdir = f"/proc/{pid}/fd"
    kinds = collections.Counter()
    names = os.listdir(fdir)
    for name in names:
        try:
            kinds[fd_class(os.readlink(os.path.join(fdir, name)))] += 1
        except OSError:
            pass
    status = open(f"/proc/{pid}/status").read()
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))
    vm = int(re.search(r"^VmSize:\s+(\d+)", status, re.M).group(1))
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for _ in f)
    return {"fds": len(names), "kinds": kinds, "threads": threads, "vm_kib": vm, "maps": maps}


def fd_class(link):
    if link.startswith("/memfd:"):
        return link.split(" ")[0]           # /memfd:cfz-shrink, /memfd:accelgate-q3, ...
    m = re.match(r"(pipe|socket|anon_inode):", link)
    if m:
        return link if m.group(1) == "anon_inode" else m.group(1)
    return link


class Target:
    name = "?"
    argv_extra = ()

    def __init__(self, binary, workdir, log):
        self.binary, self.log = binary, log
        self.workdir = tempfile.mkdtemp(prefix=f"cfz-{self.name}-", dir=workdir)
        os.chmod(self.workdir, 0o750)  # group root may traverse (connect_as)
        self.proc = None
        self.starts = 0
        self.log_path = None
        self.stats_grpc = collections.Counter()

    # -- process ------------------------------------------------------------------

    def _spawn(self, argv, ready_re, env=None):
        self.starts += 1
        self.log_path = os.path.join(self.workdir, f"{self.name}-{self.starts}.log")
        logf = open(self.log_path, "wb", buffering=0)
        logf.write(("$ " + " ".join(argv) + "\n").encode())
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env=dict(os.environ, **(env or {})))
        found, match = threading.Event(), [None]

        def pump(proc=self.proc):
            for line in iter(proc.stdout.readline, b""):
                logf.write(line)
                if match[0] is None:
                    m = re.search(ready_re, line)
                    if m:
                        match[0] = m
                        found.set()
            found.set()
            logf.close()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(30) or match[0] is None:
            self.kill()
            raise RuntimeError(f"{self.name} did not start: {self.log_tail()}")
        self.started_at = time.monotonic()
        return match[0]

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def exit_description(self):
        rc = self.proc.poll()
        if rc is None:
            return "running"
        return f"killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self):
        """SIGTERM; returns a problem description (hang, bad exit) or None."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return None
        # The daemon installs its SIGTERM handler just after its listening line.
        time.sleep(max(0.0, self.started_at + 0.3 - time.monotonic()))
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()
            return "did not exit within 15 s of SIGTERM"
        return None if rc == 0 else f"exited with {self.exit_description()} after SIGTERM"

    def log_tail(self, n=30):
        try:
            lines = open(self.log_path, "rb").read().decode(errors="replace").splitlines()
        except (OSError, TypeError):
            return "(no log)"
        return "\n".join(lines[-n:])

    def snapshot(self):
        return proc_snapshot(self.pid)

    def wait_path(self, path):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return
            except OSError:
                time.sleep(0.02)
            finally:
                s.close()
        raise RuntimeError(f"{path} never accepted a connection")

    # -- what subclasses define ---------------------------------------------------

    def start(self):
        raise NotImplementedError

    def honest(self):
        raise NotImplementedError

    def quiescent_problem(self):
        """With no fuzz connection open: anything the process still holds for them."""
        return None

    def check_reply(self, runner, conn, c, req, fds_sent, reply, fds_got, issues, tokens):
        pass

    def close(self):
        pass


class DaemonTarget(Target):
    name = "daemon"

    def start(self):
        self.control_path = os.path.join(self.workdir, "dev.sock")
        self._spawn([self.binary, "device", "--socket", self.control_path, "--engines", "1", "--pool-mib", "1",
                     "--sq-entries", "64", "--frame-timeout-ms", str(FRAME_TIMEOUT_MS)],
                    rb"accelgate device listening on ")
        self.wait_path(self.control_path)

    def _honest_conn(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(IO_S)
        s.connect(self.control_path)
        return s

    @staticmethod
    def _ask(s, obj):
        body = json.dumps(obj).encode()
        s.sendall(struct.pack("<I", len(body)) + body)
        conn = Conn(s)
        got = conn.read_frame(time.monotonic() + IO_S)
        if got[0] != "reply":
            raise OSError(f"{obj['op']}: {got[0]} {got[1:] if len(got) > 1 else ''}")
        return json.loads(got[2]), got[3]

    def honest(self):
        """hello, capabilities, heartbeat, alloc (a sealed memfd with the region magic), release."""
        try:
            with self._honest_conn() as s:
                r, _ = self._ask(s, {"op": "hello", "abi": ABI})
                if not r.get("ok"):
                    return False, f"hello refused: {r}"
                r, _ = self._ask(s, {"op": "capabilities"})
                if not r.get("ok") or not isinstance(r.get("queues"), int):
                    return False, f"capabilities: {r}"
                r, _ = self._ask(s, {"op": "heartbeat"})
                if not r.get("ok"):
                    return False, f"heartbeat: {r}"
                r, fds = self._ask(s, {"op": "alloc", "weight": 1})
                try:
                    if not r.get("ok") or len(fds) != 1:
                        return False, f"alloc: {r} with {len(fds)} fd(s)"
                    seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
                    with mmap.mmap(fds[0], 4096, prot=mmap.PROT_READ) as m:
                        magic = m[:4]
                    if magic != b"ACCL" or not seals & fcntl.F_SEAL_SHRINK:
                        return False, f"alloc passed a memfd with magic {magic!r} and seals {seals:#x}"
                finally:
                    for fd in fds:
                        _close(fd)
                r, _ = self._ask(s, {"op": "release", "queue": r["queue"]})
                if not r.get("ok"):
                    return False, f"release of its own queue: {r}"
            return True, ""
        except (OSError, ValueError) as e:
            return False, f"{type(e).__name__}: {e}"

    def queues(self):
        with self._honest_conn() as s:
            self._ask(s, {"op": "hello", "abi": ABI})
            return self._ask(s, {"op": "capabilities"})[0].get("queues")

    def quiescent_problem(self):
        deadline = time.monotonic() + 3
        while True:
            try:
                n = self.queues()
            except (OSError, ValueError) as e:
                return f"capabilities failed: {e}"
            if n == 0:
                return None
            if time.monotonic() > deadline:
                return f"{n} queue(s) still allocated with no fuzz connection open (not reclaimed)"
            time.sleep(0.05)

    def check_reply(self, runner, conn, c, req, fds_sent, reply, fds_got, issues, tokens):
        op, ok = req.get("op"), reply["ok"]
        if op == "alloc" and ok:
            if len(fds_got) != 1:
                issues.append(Issue("bad-reply", f"connection {c}: alloc ok with {len(fds_got)} descriptors"))
            else:
                seals = fcntl.fcntl(fds_got[0], fcntl.F_GET_SEALS)
                want = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
                if seals & want != want:
                    issues.append(Issue("bad-reply", f"connection {c}: alloc passed a memfd sealed {seals:#x}"))
        elif fds_got:
            issues.append(Issue("bad-reply", f"connection {c}: reply to {_short(req)} passed "
                                             f"{len(fds_got)} descriptor(s)"))
        if not ok:
            return
        if op == "hello":
            conn.greeted = True
            return
        if not conn.greeted and op is not None:
            issues.append(Issue("accepted-before-hello", f"connection {c}: {_short(req)} answered {_short(reply)} "
                                                         f"before a successful hello"))
        if op == "alloc" and isinstance(reply.get("queue"), int):
            conn.queues.append(reply["queue"])
        if op in ("release", "attach-region", "detach-region"):
            q = req.get("queue")
            if q not in conn.queues:
                issues.append(Issue("ownership-violation", f"connection {c}: {_short(req)} accepted for a queue "
                                                           f"it does not own (owns {conn.queues})"))
            elif op == "release":
                conn.queues.remove(q)
        if op == "attach-region":
            why = bad_region_reason(req.get("size"), fds_sent, req.get("region"))
            if why:
                issues.append(Issue("accepted-bad-region", f"connection {c}: attach-region accepted {why}: "
                                                           f"{_short(req)} with {fds_sent}"))
        if op in ("inject", "lift-isolation"):
            issues.append(Issue("fault-control-open", f"connection {c}: {op} accepted on a daemon started without "
                                                      f"--allow-fault-control"))


def bad_region_reason(size, fds_sent, region_id=None):
    """Why a region must be refused (DEVICE_ABI.md §13, LOCAL_LANE.md), or None."""
    if region_id is not None and not (isinstance(region_id, int) and 1 <= region_id <= EXT_REGION_MAX):
        return f"region id {region_id}"
    if len(fds_sent) != 1:
        return f"{len(fds_sent)} descriptors"
    f = fds_sent[0]
    if not isinstance(size, int) or not 1 <= size <= MAX_REGION:
        return f"size {size}"
    if f["kind"] not in ("memfd",):
        return f"a {f['kind']} descriptor"
    if not f.get("seals", 0) & fcntl.F_SEAL_SHRINK:
        return "a memfd not sealed against shrinking"
    if max(f.get("file_size", 0), f.get("may_grow_to", 0)) < size:
        return f"a {f.get('file_size')}-byte memfd for {size} bytes"
    return None


class LaneTarget(Target):
    name = "lane"

    def start(self):
        self.stub_module()
        import grpc
        tenants = os.path.join(self.workdir, "tenants.yaml")
        with open(tenants, "w") as f:
            f.write("tenants:\n")
            for tid, key in KEYS.items():
                f.write(f"  - id: {tid}\n    api_key_sha256: [{hashlib.sha256(key.encode()).hexdigest()}]\n")
        self.grpc_path = os.path.join(self.workdir, "ag.sock")
        self.control_path = self.grpc_path + ".ctl"
        m = self._spawn([self.binary, "serve", "--host", "127.0.0.1", "--port", "0", "--no-metrics",
                         "--tenants", tenants, "--local-socket", self.grpc_path, "--queues", "2", "--engines", "1",
                         "--pool-mib", "16", "--sq-entries", "64"], rb"accelgate listening on 127\.0\.0\.1:(\d+)",
                        env={"ACCELGATE_LOCAL_FRAME_TIMEOUT_MS": str(FRAME_TIMEOUT_MS)})
        self.port = int(m.group(1))
        self.wait_path(self.control_path)
        self.tcp = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.unix = grpc.insecure_channel(f"unix:{self.grpc_path}")
        self.stub = self.pb_grpc.AcceleratorStub(self.unix)
        self.health = self.health_grpc.HealthStub(self.tcp)

    def stub_module(self):
        sys.path.insert(0, os.path.join(ROOT, "tests", "interop"))
        import gen_stubs
        gen_stubs.OUT = STUBS_DIR  # keep generated files inside fuzz/control/
        marker = os.path.join(STUBS_DIR, "accelgate", "v1", "accelerator_pb2.py")
        proto = os.path.join(ROOT, "proto", "accelgate", "v1", "accelerator.proto")
        if not os.path.exists(marker) or os.path.getmtime(marker) < os.path.getmtime(proto):
            gen_stubs.generate()
        if STUBS_DIR not in sys.path:
            sys.path.insert(0, STUBS_DIR)
        from accelgate.v1 import accelerator_pb2 as pb, accelerator_pb2_grpc as pb_grpc
        from agstubs_health import health_pb2, health_pb2_grpc
        self.pb, self.pb_grpc, self.health_pb, self.health_grpc = pb, pb_grpc, health_pb2, health_pb2_grpc

    def close(self):
        for ch in (getattr(self, "tcp", None), getattr(self, "unix", None)):
            if ch is not None:
                ch.close()

    def honest(self):
        """Health (TCP), a tiny Compress (Unix socket), and a lane round trip: register a
        sealed memfd, Compress a span of it, unregister."""
        import grpc
        md = (("authorization", f"Bearer {KEYS['honest']}"),)
        try:
            h = self.health.Check(self.health_pb.HealthCheckRequest(), timeout=IO_S)
            if h.status != self.health_pb.HealthCheckResponse.SERVING:
                return False, f"health {h.status}"
            data = b"honest client " * 50
            r = self.stub.Compress(self.pb.CompressRequest(format=self.pb.COMPRESSION_FORMAT_ZLIB, data=data),
                                   metadata=md, timeout=IO_S)
            if zlib.decompress(r.data) != data:
                return False, "Compress returned the wrong bytes"
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(IO_S)
            with s:
                s.connect(self.control_path)
                fd = os.memfd_create("cfz-honest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                try:
                    os.ftruncate(fd, 1 << 16)
                    os.pwrite(fd, data, 0)
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS["shrink+grow"])
                    body = json.dumps({"op": "register", "api_key": KEYS["honest"], "size": 1 << 16}).encode()
                    socket.send_fds(s, [struct.pack("<I", len(body)) + body], [fd])
                finally:
                    os.close(fd)
                conn = Conn(s)
                got = conn.read_frame(time.monotonic() + IO_S)
                if got[0] != "reply":
                    return False, f"register: {got}"
                reply = json.loads(got[2])
                if not reply.get("ok"):
                    return False, f"register refused: {reply}"
                span = self.pb.RegionSpan(region=reply["region"], offset=0, length=len(data))
                r = self.stub.Compress(self.pb.CompressRequest(format=self.pb.COMPRESSION_FORMAT_ZLIB,
                                                               input_region=span), metadata=md, timeout=IO_S)
                if zlib.decompress(r.data) != data:
                    return False, "Compress of a span returned the wrong bytes"
                body = json.dumps({"op": "unregister", "api_key": KEYS["honest"], "region": reply["region"]}).encode()
                s.sendall(struct.pack("<I", len(body)) + body)
                got = conn.read_frame(time.monotonic() + IO_S)
                if got[0] != "reply" or not json.loads(got[2]).get("ok"):
                    return False, f"unregister: {got}"
            return True, ""
        except grpc.RpcError as e:
            return False, f"gRPC {e.code().name}: {e.details()}"
        except (OSError, ValueError, KeyError) as e:
            return False, f"{type(e).__name__}: {e}"

    def check_reply(self, runner, conn, c, req, fds_sent, reply, fds_got, issues, tokens):
        if fds_got:
            issues.append(Issue("bad-reply", f"connection {c}: reply passed {len(fds_got)} descriptor(s)"))
        if not reply["ok"]:
            return
        op = req.get("op")
        tenant = TENANT_OF_KEY.get(req.get("api_key")) if isinstance(req.get("api_key"), str) else None
        if tenant is None:
            issues.append(Issue("auth-bypass", f"connection {c}: {_short(req)} accepted without a valid API key: "
                                               f"{_short(reply)}"))
            return
        if op == "register":
            why = bad_region_reason(req.get("size"), fds_sent)
            if why:
                issues.append(Issue("accepted-bad-region", f"connection {c}: register accepted {why}: {_short(req)}"))
            if reply.get("tenant") != tenant:
                issues.append(Issue("bad-reply", f"connection {c}: register as {tenant} answered tenant "
                                                 f"{reply.get('tenant')!r}"))
            if isinstance(reply.get("region"), str):
                fsize = fds_sent[0].get("file_size", 0) if fds_sent else 0
                conn.regions.append({"token": reply["region"], "size": req.get("size"), "file_size": fsize})
                tokens[reply["region"]] = tenant
        elif op == "unregister":
            owner = tokens.get(req.get("region"))
            if owner is not None and owner != tenant:
                issues.append(Issue("cross-tenant-unregister", f"connection {c}: {tenant} unregistered a region "
                                                               f"of {owner}"))
            tokens.pop(req.get("region"), None)
            conn.regions = [r for r in conn.regions if r["token"] != req.get("region")]
        else:
            issues.append(Issue("bad-reply", f"connection {c}: unknown op accepted: {_short(req)}"))


TARGETS = {"daemon": DaemonTarget, "lane": LaneTarget}


# ======================================================================================
# Generators: each returns a Case (steps only; nothing runs here)

LENGTHS = [0, 1, 2, 3, 4, 5, 64, MAX_FRAME, MAX_FRAME + 1, 1 << 20, 1 << 31, U32 - 1, U32]
RAW_VALUES = ["null", "true", "false", "0", "1", "-1", "65535", "65536", "4096", "4097", "4294967295",
              "4294967296", "9223372036854775807", "18446744073709551615", "18446744073709551616",
              "340282366920938463463374607431768211456", "-9223372036854775809", "1e400", "-1e400", "1.5",
              "1e2", "0.0", "-0", "01", "0x10", "+1", "NaN", "Infinity", '""', '"x"', '"1"', '"\\u0000"',
              '"\\ud800"', '"\\uDFFF\\uD800"', "[]", "[1,2,3]", "{}", '{"op":"hello"}', '{"a":[{"b":{}}]}',
              '"' + "A" * 3000 + '"', "[" * 64 + "]" * 64]
DAEMON_OPS = ["hello", "capabilities", "alloc", "release", "heartbeat", "status", "inject", "lift-isolation",
              "attach-region", "detach-region"]
DAEMON_FIELDS = ["abi", "weight", "queue", "fault", "region", "size"]
LANE_OPS = ["register", "unregister"]
LANE_FIELDS = ["api_key", "size", "region"]
BOGUS_OPS = ["", "HELLO", "hello ", " hello", "attach_region", "attachRegion", "liftIsolation", "register\u0000",
             "unregister-all", "\u00e9", "op", "alloc\n", "x" * 200]
REGION_IDS = [0, 1, 2, 4095, 4096, 4097, 65535]
BAD_REGION_IDS_RAW = ["-1", "65536", "1.5", '"1"', "null"]


def valid_request(rng, target):
    if target == "daemon":
        return rng.choice([{"op": "hello", "abi": ABI}, {"op": "heartbeat"}, {"op": "capabilities"},
                           {"op": "status"}, {"op": "alloc", "weight": 1}])
    return rng.choice([{"op": "register", "api_key": "$key:alpha", "size": 4096},
                       {"op": "unregister", "api_key": "$key:beta", "region": "r9-nope"},
                       {"op": "hello"}])


def random_fds(rng, n=None):
    n = n if n is not None else rng.choice([1, 1, 2, 3, 8, 9])
    specs = []
    for _ in range(n):
        if rng.random() < 0.4:
            specs.append(memfd(rng.choice([1, 4096, 1 << 20]), rng.choice(list(SEALS))))
        else:
            specs.append(fdk(rng.choice(OTHER_FD_KINDS)))
    return specs


def hello():
    return send_json(0, {"op": "hello", "abi": ABI})


# -- shared by both targets ---------------------------------------------------------

def g_random_bytes(rng, target):
    n = rng.choice([1, 2, 3, 4, 5, 7, 17, 100, 1000, 4096, 70000])
    steps = [connect(0)]
    if target == "daemon" and rng.random() < 0.5:
        steps += [hello(), recv(0)]
    if rng.random() < 0.5:
        steps.append({"op": "send", "c": 0, "raw": {"rand": rng.getrandbits(32), "n": n}})
        tag = f"{n} random bytes, unframed"
    else:
        steps.append({"op": "send", "c": 0, "body": {"rand": rng.getrandbits(32), "n": min(n, MAX_FRAME)}})
        tag = f"{min(n, MAX_FRAME)} random bytes, framed"
    steps += [recv(0), close(0)]
    return Case("random_bytes", steps, tag)


def g_length_prefix(rng, target):
    n = rng.choice(LENGTHS)
    body = json.dumps(valid_request(rng, target)).encode()
    short = body[:rng.randrange(0, len(body) + 1)] if rng.random() < 0.7 else b""
    steps = [connect(0), send_raw(0, struct.pack("<I", n) + short)]
    end = rng.choice(["close", "shutdown", "recv"])
    if end == "shutdown":
        steps += [{"op": "shutdown", "c": 0}, recv(0)]
    elif end == "recv":
        steps.append(recv(0))
    steps.append(close(0))
    return Case("length_prefix", steps, f"prefix {n} with {len(short)} body bytes, then {end}")


def g_truncated_with_fds(rng, target):
    """A frame with descriptors attached, cut short (in the header or the body), then closed."""
    req = valid_request(rng, target)
    if target == "daemon" and rng.random() < 0.5:
        req = {"op": "attach-region", "queue": "$q0", "region": 1, "size": 4096}
    body = json.dumps(req).encode()
    full = struct.pack("<I", len(body)) + body
    where = rng.choice(["header", "body"])
    fds = random_fds(rng)
    steps = [connect(0)]
    if target == "daemon" and rng.random() < 0.5:
        steps += [hello(), recv(0), send_json(0, {"op": "alloc", "weight": 1}), recv(0)]
    if where == "header":
        cut = rng.randrange(1, 4)
        steps.append(send_raw(0, full[:cut], fds=fds))
    else:
        cut = rng.randrange(5, len(full))
        steps.append(send_raw(0, full[:cut], fds=fds, chunks=2, fds_at=rng.choice([0, 1]), gap=0.002))
    steps.append(rng.choice([close(0), {"op": "shutdown", "c": 0}]))
    return Case("truncated_with_fds", steps + [close(0)],
                f"frame cut in the {where} at byte {cut} of {len(full)}, {len(fds)} fd(s): "
                f"{sorted(set(f['kind'] for f in fds))}")


def g_fd_flood(rng, target):
    n = rng.choice([2, 8, 9, 16, 64, 200, SCM_MAX_FD])
    kind = rng.choice(["pipe_r", "devnull", "eventfd", "memfd", "mixed"])
    if kind == "memfd":
        fds = [memfd(4096, "shrink+grow", count=n)]
    elif kind == "mixed":
        fds = random_fds(rng, min(n, 24))
    else:
        fds = [fdk(kind, n)]
    steps = [connect(0)]
    if target == "daemon" and rng.random() < 0.7:
        steps += [hello(), recv(0)]
        if rng.random() < 0.5:
            steps += [send_json(0, {"op": "alloc", "weight": 1}), recv(0)]
    steps += [send_json(0, valid_request(rng, target) if rng.random() < 0.5 else (
        {"op": "attach-region", "queue": "$q0", "region": 7, "size": 4096} if target == "daemon" else
        {"op": "register", "api_key": "$key:alpha", "size": 4096}), fds=fds), recv(0)]
    steps += [send_json(0, valid_request(rng, target)), recv(0), close(0)]
    return Case("fd_flood", steps, f"{n} x {kind}")


def _garbage_object(rng, ops, fields):
    parts = []
    if rng.random() < 0.9:
        parts.append('"op":' + (json.dumps(rng.choice(ops + BOGUS_OPS)) if rng.random() < 0.7
                                else rng.choice(RAW_VALUES)))
    for _ in range(rng.randrange(0, 4)):
        f = rng.choice(fields + ["op", "extra", "", "OP", "queue\u0000"])
        parts.append(json.dumps(f) + ":" + rng.choice(RAW_VALUES))
    rng.shuffle(parts)
    return "{" + ",".join(parts) + "}"


def g_json_garbage(rng, target):
    ops, fields = (DAEMON_OPS, DAEMON_FIELDS) if target == "daemon" else (LANE_OPS, LANE_FIELDS)
    steps = [connect(0)]
    if target == "daemon" and rng.random() < 0.6:
        steps += [hello(), recv(0)]
        if rng.random() < 0.5:
            steps += [send_json(0, {"op": "alloc", "weight": 1}), recv(0)]
    shape = rng.choice(["object", "object", "object", "toplevel", "trailing", "bytes"])
    if shape == "object":
        text = _garbage_object(rng, ops, fields)
        if target == "lane" and rng.random() < 0.6 and '"api_key"' not in text:
            text = text[:-1] + (',' if len(text) > 2 else '') + '"api_key":"$key:alpha"}'
        steps.append(send_text(0, text))
    elif shape == "toplevel":
        steps.append(send_text(0, rng.choice(RAW_VALUES + ["", " ", "\t\n", "{", "}", '{"op"}', '{"op":}',
                                                           '{"op":"hello",}', "/*c*/{}", '{"op":"hello"}//'])))
    elif shape == "trailing":
        steps.append(send_text(0, json.dumps(valid_request(rng, target)) + rng.choice(
            ["x", "{}", " {\"op\":\"alloc\"}", "\u0000", ",", "]"])))
    else:
        bad = rng.choice([b"\xff\xfe{}", b"\xef\xbb\xbf{\"op\":\"heartbeat\"}", b'{"op":"\xc3\x28"}',
                          b'{"op":"hello","abi":65540}\x00', b'{"op":"\xed\xa0\x80"}'])
        steps.append({"op": "send", "c": 0, "body": {"hex": bad.hex()}})
    steps += [recv(0), send_json(0, valid_request(rng, target)), recv(0), close(0)]
    return Case("json_garbage", steps, shape)


def g_deep_nesting(rng, target):
    depth = rng.choice([100, 600, 1000, 5000, 20000, 32000])
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    balanced = rng.random() < 0.6
    inner = opener * depth + ("1" + closer * depth if balanced else "")
    field = "queue" if target == "daemon" else "size"
    text = '{"op":"' + ("heartbeat" if target == "daemon" else "register") + '","' + field + '":' + inner + "}"
    text = text[:MAX_FRAME]
    steps = [connect(0)]
    if target == "daemon":
        steps += [hello(), recv(0)]
    steps += [send_text(0, text), recv(0), close(0)]
    return Case("deep_nesting", steps, f"{depth} x {opener!r} {'balanced' if balanced else 'unclosed'}")


def g_slow_loris(rng, target):
    reqs = [valid_request(rng, target) for _ in range(rng.randrange(1, 3))]
    if target == "daemon":
        reqs.insert(0, {"op": "hello", "abi": ABI})
    steps = [connect(0)]
    for r in reqs:
        body = json.dumps(r).encode()
        steps.append(send_json(0, r, chunks=len(body) + 4, gap=rng.choice([0.0005, 0.002, 0.005])))
    steps += [recv(0), close(0)]
    return Case("slow_loris", steps, f"{len(reqs)} frame(s) a byte at a time")


def g_hold_partial(rng, target):
    """Many connections each holding a partial frame while an honest client is served."""
    n = rng.choice([10, 50, 120, 250])
    steps = []
    for c in range(n):
        steps.append(connect(c))
        kind = rng.randrange(4)
        body = json.dumps(valid_request(rng, target)).encode()
        if kind == 1:
            steps.append(send_raw(c, struct.pack("<I", len(body))[:rng.randrange(1, 4)]))
        elif kind == 2:
            steps.append(send_raw(c, struct.pack("<I", len(body)) + body[:rng.randrange(0, len(body))]))
        elif kind == 3:
            steps.append(send_raw(c, struct.pack("<I", MAX_FRAME)))
    steps.append({"op": "honest"})
    order = list(range(n))
    rng.shuffle(order)
    steps += [close(c) for c in order]
    return Case("hold_partial", steps, f"{n} connections holding partial frames")


def g_many_connections(rng, target):
    """Many connections opened, used a little, abandoned in a random order."""
    n = rng.choice([20, 64, 100, 200, 300])
    steps = []
    for c in range(n):
        steps.append(connect(c))
        r = rng.random()
        if r < 0.3:
            steps.append(send_json(c, valid_request(rng, target)))
        elif r < 0.4:
            steps.append({"op": "shutdown", "c": c})
        elif r < 0.5 and target == "daemon":
            steps += [send_json(c, {"op": "hello", "abi": ABI}), send_json(c, {"op": "alloc", "weight": 2})]
    order = list(range(n))
    rng.shuffle(order)
    for c in order:
        if rng.random() < 0.2:
            steps.append(recv(c))
        steps.append(close(c))
    return Case("many_connections", steps, f"{n} connections")


def g_pipelined(rng, target):
    reqs = [valid_request(rng, target) for _ in range(rng.randrange(2, 60))]
    if target == "daemon":
        reqs.insert(0, {"op": "hello", "abi": ABI})
    stream = b"".join(struct.pack("<I", len(b)) + b for b in (json.dumps(r).encode() for r in reqs))
    steps = [connect(0)]
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randrange(0, 6))))
    for a, b in zip([0] + cuts, cuts + [len(stream)]):
        steps.append(send_raw(0, stream[a:b]))
    steps += [recv(0), close(0)]
    return Case("pipelined", steps, f"{len(reqs)} frames in {len(cuts) + 1} writes")


def g_frame_limit(rng, target):
    """Bodies of exactly 64 KiB (allowed) and 64 KiB + 1 (refused), padded with spaces."""
    req = json.dumps(valid_request(rng, target))
    n = rng.choice([MAX_FRAME - 1, MAX_FRAME, MAX_FRAME + 1])
    text = req[:-1] + " " * (n - len(req)) + "}"
    steps = [connect(0)]
    if target == "daemon":
        steps += [hello(), recv(0)]
    steps += [send_text(0, text, fds=random_fds(rng, 1) if rng.random() < 0.3 else None), recv(0), close(0)]
    return Case("frame_limit", steps, f"{n}-byte body")


def g_long_strings(rng, target):
    """Long strings (needing JSON escapes) in fields a refusal may echo back."""
    ch = rng.choice(["\u0001", '"', "\\", "\u00e9", "\u2028", "a", "<"])
    n = rng.choice([100, 5000, 20000])
    s = ch * n
    if target == "daemon":
        req = rng.choice([{"op": s}, {"op": "inject", "fault": s}, {"op": "hello", "abi": s}])
    else:
        req = rng.choice([{"op": s, "api_key": "$key:alpha"}, {"op": "register", "api_key": s, "size": 1},
                          {"op": "unregister", "api_key": "$key:alpha", "region": s}])
    body = json.dumps(req)
    if len(body.encode()) > MAX_FRAME:
        return Case("long_strings", [connect(0), close(0)], "too long, skipped")
    steps = [connect(0)]
    if target == "daemon":
        steps += [hello(), recv(0)]
    steps += [send_json(0, req), recv(0), close(0)]
    return Case("long_strings", steps, f"{n} x {ch!r} in {list(req)}")


# -- daemon only ---------------------------------------------------------------------

def g_before_hello(rng, target):
    """Every op before hello, notably attach-region with descriptors."""
    steps = [connect(0)]
    ops = rng.sample(DAEMON_OPS[1:], rng.randrange(1, len(DAEMON_OPS)))
    if "attach-region" not in ops and rng.random() < 0.5:
        ops.append("attach-region")
    for op in ops:
        req = {"op": op, "queue": rng.choice([0, 1, 2, MISSING_QUEUE]), "region": rng.choice(REGION_IDS),
               "size": rng.choice([1, 4096, 1 << 20]), "weight": 1, "fault": "none"}
        fds = None
        if op == "attach-region" or rng.random() < 0.2:
            fds = random_fds(rng, rng.choice([1, 1, 2, 5]))
        steps += [send_json(0, req, fds=fds), recv(0)]
    if rng.random() < 0.5:
        steps += [hello(), recv(0), send_json(0, {"op": "heartbeat"}), recv(0)]
    steps.append(close(0))
    return Case("before_hello", steps, "ops " + ",".join(ops))


def g_bad_hello(rng, target):
    steps = [connect(0)]
    abis = [0, 1, 0x00010000, 0x0001FFFF, 0x00020004, 0x00000004, 0xFFFF0004, U32, ABI]
    for _ in range(rng.randrange(1, 6)):
        v = rng.choice(abis + ["-1", "4294967296", '"65540"', "null", "1.5", "missing"])
        if v == "missing":
            steps.append(send_json(0, {"op": "hello"}))
        elif isinstance(v, str):
            steps.append(send_text(0, '{"op":"hello","abi":' + v + "}"))
        else:
            steps.append(send_json(0, {"op": "hello", "abi": v}))
        steps.append(recv(0))
        if rng.random() < 0.5:
            steps += [send_json(0, {"op": rng.choice(["alloc", "capabilities", "heartbeat"]), "weight": 1}), recv(0)]
    steps.append(close(0))
    return Case("bad_hello", steps, "repeated hellos")


def g_ownership(rng, target):
    """Release, attach and detach of queues another connection owns, or nobody does; twice."""
    steps = [connect(0), hello(), recv(0), connect(1), send_json(1, {"op": "hello", "abi": ABI}), recv(1)]
    for _ in range(rng.randrange(1, 4)):
        steps += [send_json(0, {"op": "alloc", "weight": rng.choice([0, 1, 3, 255, U32])}), recv(0)]
    steps += [send_json(1, {"op": "alloc", "weight": 1}), recv(1)]
    for _ in range(rng.randrange(2, 10)):
        who = rng.choice([0, 1])
        q = rng.choice(["$q0@0", "$q1@0", "$q0@1", "$q0", 0, 1, MISSING_QUEUE, U32])
        op = rng.choice(["release", "release", "attach-region", "detach-region"])
        req = {"op": op, "queue": q, "region": rng.choice(REGION_IDS), "size": 4096}
        fds = [memfd(4096)] if op == "attach-region" else None
        steps += [send_json(who, req, fds=fds), recv(who)]
    if rng.random() < 0.5:
        steps += [send_json(0, {"op": "release", "queue": "$q0"}), recv(0),
                  send_json(0, {"op": "release", "queue": "$q0"}), recv(0)]
    if rng.random() < 0.3:
        steps += [send_text(0, '{"op":"alloc","weight":' + rng.choice(["-1", "4294967296", "1.5", '"2"']) + "}"),
                  recv(0)]
    steps += [close(1), close(0)]
    return Case("ownership", steps, "foreign and repeated release/attach/detach")


def g_alloc_flood(rng, target):
    n = rng.choice([5, 40, MAX_QUEUES + 3])
    steps = [connect(0), hello(), recv(0)]
    steps += [send_json(0, {"op": "alloc", "weight": 1}) for _ in range(n)] + [recv(0)]
    for _ in range(rng.randrange(0, 5)):
        q = f"$q{rng.randrange(n)}"
        steps += [send_json(0, {"op": "release", "queue": q}), recv(0)] * 2
    steps.append(close(0))
    return Case("alloc_flood", steps, f"{n} allocs on one connection, closed without releasing")


def g_attach_regions(rng, target):
    """attach/detach with odd region ids, sizes and descriptors, on the caller's own queue."""
    steps = [connect(0), hello(), recv(0), send_json(0, {"op": "alloc", "weight": 1}), recv(0)]
    for _ in range(rng.randrange(1, 8)):
        file_size = rng.choice([1, 4096, 1 << 20, 1 << 30])
        size = rng.choice([0, 1, file_size, file_size + 1, MAX_REGION, MAX_REGION + 1, 1 << 63, U64])
        if size == MAX_REGION and rng.random() < 0.5:
            file_size = MAX_REGION
        region = rng.choice(REGION_IDS)
        kind = rng.random()
        if kind < 0.55:
            fds = [memfd(size, rng.choice(list(SEALS)), file_size=file_size,
                         after=rng.choice([None, None, "shrink", "grow"]), ro=rng.random() < 0.1)]
        elif kind < 0.8:
            fds = [fdk(rng.choice(OTHER_FD_KINDS))]
        elif kind < 0.9:
            fds = [memfd(4096, count=rng.choice([2, 3, 8]))]
        else:
            fds = []
        if rng.random() < 0.15:
            steps.append(send_text(0, '{"op":"attach-region","queue":$q0,"region":' + rng.choice(BAD_REGION_IDS_RAW)
                                   + ',"size":4096}', fds=fds))
        else:
            steps.append(send_json(0, {"op": "attach-region", "queue": "$q0", "region": region, "size": size},
                                   fds=fds))
        steps.append(recv(0))
        if rng.random() < 0.4:
            steps += [send_json(0, {"op": "detach-region", "queue": "$q0", "region": region}), recv(0)]
        if rng.random() < 0.2:
            steps += [send_json(0, {"op": "detach-region", "queue": "$q0", "region": region}), recv(0)]
    if rng.random() < 0.5:
        steps += [send_json(0, {"op": "release", "queue": "$q0"}), recv(0)]
    steps.append(close(0))
    return Case("attach_regions", steps, "region ids, sizes and descriptors")


def g_self_socket(rng, target):
    """Passes the connection's own socket (or a socketpair end) over itself."""
    greeted = rng.random() < 0.5
    steps = [connect(0)]
    if greeted:
        steps += [hello(), recv(0), send_json(0, {"op": "alloc", "weight": 1}), recv(0)]
    op = rng.choice(["attach-region", "heartbeat", "hello"])
    steps += [send_json(0, {"op": op, "abi": ABI, "queue": "$q0", "region": 3, "size": 4096},
                        fds=[fdk(rng.choice(["self", "socket"]))]), recv(0), close(0)]
    return Case("self_socket", steps, f"{op} {'after' if greeted else 'before'} hello")


def g_foreign_uid(rng, target):
    if os.geteuid() != 0:
        return g_bad_hello(rng, target)
    uid = rng.choice([65534, 12345])
    steps = [connect(0, uid=uid), hello(), recv(0), send_json(0, {"op": "alloc", "weight": 1},
                                                            fds=[memfd(4096)]), recv(0), close(0)]
    return Case("foreign_uid", steps, f"peer uid {uid}")


def g_fault_ops(rng, target):
    faults = ["none", "error", "error,every=1", "stall", "latency,latency-ms=99999999", "lost,every=0",
              "corrupt-output,queue=4294967295", "bogus", ",", "=", "error,every=-1", "x" * 500,
              "error,every=18446744073709551616"]
    steps = [connect(0), hello(), recv(0)]
    for _ in range(rng.randrange(1, 5)):
        op = rng.choice(["inject", "lift-isolation", "status"])
        steps += [send_json(0, {"op": op, "fault": rng.choice(faults)}), recv(0)]
    steps.append(close(0))
    return Case("fault_ops", steps, "inject/lift-isolation/status")


# -- lane only -----------------------------------------------------------------------

def g_lane_register(rng, target):
    steps = [connect(0)]
    for _ in range(rng.randrange(1, 8)):
        key = rng.choice(["$key:alpha", "$key:beta", "$key:alpha", "cfz-wrong", "", None, "raw"])
        file_size = rng.choice([1, 4096, 1 << 20, 1 << 30])
        size = rng.choice([0, 1, file_size, file_size, file_size + 1, MAX_REGION, MAX_REGION + 1, U64])
        if size == MAX_REGION and rng.random() < 0.5:
            file_size = MAX_REGION
        r = rng.random()
        if r < 0.65:
            fds = [memfd(size, rng.choice(list(SEALS)), file_size=file_size,
                         after=rng.choice([None, None, "shrink", "grow"]), ro=rng.random() < 0.1)]
        elif r < 0.85:
            fds = [fdk(rng.choice(OTHER_FD_KINDS))]
        elif r < 0.93:
            fds = [memfd(4096, count=rng.choice([2, 3, 9]))]
        else:
            fds = []
        if key == "raw":
            steps.append(send_text(0, '{"op":"register","api_key":' + rng.choice(RAW_VALUES[:12]) + ',"size":4096}',
                                   fds=fds))
        else:
            req = {"op": "register", "size": size}
            if key is not None:
                req["api_key"] = key
            steps.append(send_json(0, req, fds=fds))
        steps.append(recv(0))
    if rng.random() < 0.5:
        steps += [send_json(0, {"op": "unregister", "api_key": "$key:alpha", "region": "$r0"}), recv(0)] * 2
    steps.append(close(0))
    return Case("lane_register", steps, "keys, sizes, seals and descriptors")


def g_lane_cross(rng, target):
    """Tokens used across connections and tenants; regions left to the connection close."""
    steps = [connect(0), connect(1)]
    for c, key in ((0, "$key:alpha"), (1, "$key:beta")):
        for _ in range(rng.randrange(1, 3)):
            steps += [send_json(c, {"op": "register", "api_key": key, "size": 8192}, fds=[memfd(8192)]), recv(c)]
    for _ in range(rng.randrange(1, 6)):
        c = rng.choice([0, 1])
        steps += [send_json(c, {"op": "unregister", "api_key": rng.choice(["$key:alpha", "$key:beta", "bad"]),
                                "region": rng.choice(["$r0@0", "$r1@0", "$r0@1", "$r5@1", "", "r1-", "r0-00",
                                                      "r4097-" + "0" * 32, "x" * 300])}), recv(c)]
    if rng.random() < 0.5:
        steps.append({"op": "grpc", "call": "compress", "tenant": rng.choice(["alpha", "beta"]),
                      "in": {"region": rng.choice(["$r0@0", "$r0@1"]), "offset": 0, "length": 100}})
    steps += [close(rng.choice([0, 1])), close(0), close(1)]
    return Case("lane_cross", steps, "cross-connection and cross-tenant tokens")


def g_lane_spans(rng, target):
    """gRPC calls with odd spans of registered regions, some while the region goes away."""
    size = rng.choice([4096, 1 << 16, 1 << 20, 4 << 20])
    steps = [connect(0), send_json(0, {"op": "register", "api_key": "$key:alpha", "size": size},
                                   fds=[memfd(size)]), recv(0)]
    if rng.random() < 0.5:
        steps += [connect(1), send_json(1, {"op": "register", "api_key": "$key:beta", "size": 4096},
                                        fds=[memfd(4096)]), recv(1)]
    offsets = [0, 1, size - 1, size, size + 1, U64, 1 << 63]
    lengths = [0, 1, 100, size, size + 1, U64, (1 << 64) - size + 1, 4 << 20, (4 << 20) + 1]
    for _ in range(rng.randrange(1, 6)):
        step = {"op": "grpc", "call": rng.choice(["compress", "compress", "digest"]),
                "tenant": rng.choice(["alpha", "alpha", "alpha", "beta", "none", "badkey"]),
                "in": {"region": rng.choice(["$r0", "$r0", "$r0@1", "", "nope"]), "offset": rng.choice(offsets),
                       "length": rng.choice(lengths)}}
        if rng.random() < 0.4:
            step["out"] = {"region": rng.choice(["$r0", "$r0@1"]), "offset": rng.choice(offsets),
                           "length": rng.choice(lengths)}
        if rng.random() < 0.3:
            step["async"] = True
        steps.append(step)
    ending = rng.choice(["close", "unregister", "join"])
    if ending == "unregister":
        steps += [send_json(0, {"op": "unregister", "api_key": "$key:alpha", "region": "$r0"}), recv(0)]
    elif ending == "join":
        steps.append({"op": "join"})
    steps += [close(0), close(1)]
    return Case("lane_spans", steps, f"{size}-byte region, then {ending}")


def g_lane_region_flood(rng, target):
    n = rng.choice([20, 100, 300])
    steps = [connect(0)]
    steps += [send_json(0, {"op": "register", "api_key": "$key:alpha", "size": 4096}, fds=[memfd(4096)])
              for _ in range(n)]
    steps += [recv(0)]
    if rng.random() < 0.5:
        steps += [send_json(0, {"op": "unregister", "api_key": "$key:alpha", "region": f"$r{i}"})
                  for i in range(0, n, 3)] + [recv(0)]
    steps.append(close(0))
    return Case("lane_region_flood", steps, f"{n} regions on one connection")


SHARED = [g_random_bytes, g_length_prefix, g_truncated_with_fds, g_fd_flood, g_json_garbage, g_deep_nesting,
          g_slow_loris, g_hold_partial, g_many_connections, g_pipelined, g_frame_limit, g_long_strings]
GENERATORS = {
    "daemon": SHARED + [g_before_hello, g_bad_hello, g_ownership, g_alloc_flood, g_attach_regions, g_attach_regions,
                        g_self_socket, g_foreign_uid, g_fault_ops],
    "lane": SHARED + [g_lane_register, g_lane_register, g_lane_cross, g_lane_spans, g_lane_spans,
                      g_lane_region_flood],
}


# ======================================================================================
# Oracles that need the process at rest

def settle(target, want, deadline_s=3.0, stable_s=0.3, patience_s=None):
    """Polls the process until its descriptors and threads are back to `want`'s, or stop
    changing above it for stable_s (but not before patience_s: by default a frame timeout
    and a little, since a half-sent frame may hold what came with it that long), or
    deadline_s passes. Returns (at_rest, snapshot)."""
    patience_s = HOLD_S if patience_s is None else patience_s
    start = time.monotonic()
    end = start + max(deadline_s, patience_s)
    last, since = None, time.monotonic()
    while True:
        snap = target.snapshot()
        if snap["fds"] <= want["fds"] and snap["threads"] <= want["threads"]:
            return True, snap
        key = (snap["fds"], snap["threads"])
        now = time.monotonic()
        if key != last:
            last, since = key, now
        elif (now - since >= stable_s and now - start >= patience_s) or now > end:
            return False, snap
        time.sleep(0.01)


def kinds_diff(before, after):
    d = after["kinds"] - before["kinds"]
    return dict(sorted(d.items()))


class Findings:
    """Writes one reproducer per distinct finding (a few per kind and generator), counts all."""

    def __init__(self, seed, binary):
        self.seed, self.binary = seed, binary
        self.counts = collections.Counter()
        self.unique = {}
        self.files = []
        self.per_kind = collections.Counter()

    def add(self, target, kind, detail, cases, signature=None, extra=None):
        name = "+".join(sorted({c.name for c in cases})) if cases else "-"
        sig = (target, kind, name, signature)
        self.counts[(target, kind)] += 1
        if sig in self.unique:
            self.unique[sig]["occurrences"] += 1
            return None
        entry = {"occurrences": 1, "detail": detail, "file": None}
        self.unique[sig] = entry
        self.per_kind[(target, kind, name)] += 1
        if self.per_kind[(target, kind, name)] > 3:
            return None
        os.makedirs(FINDINGS_DIR, exist_ok=True)
        gi = os.path.join(FINDINGS_DIR, ".gitignore")
        if not os.path.exists(gi):
            with open(gi, "w") as f:
                f.write("# reproducers written by control_fuzz.py at run time\n*\n")
        n = len(self.files) + 1
        path = os.path.join(FINDINGS_DIR, f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{n:03d}-{target}-"
                                          f"{kind}-{re.sub(r'[^a-z0-9_+]+', '_', name)[:40]}.jsonl")
        header = {"finding": kind, "target": target, "detail": detail, "signature": signature, "seed": self.seed,
                  "binary": self.binary, "replay": f"python3 fuzz/control/control_fuzz.py --replay {os.path.relpath(path, ROOT)}"}
        if extra:
            header.update(extra)
        with open(path, "w") as f:
            f.write(json.dumps(header) + "\n")
            for i, c in enumerate(cases):
                for line in c.to_lines(i):
                    f.write(json.dumps(line) + "\n")
        entry["file"] = path
        self.files.append(path)
        return path


# ======================================================================================
# The campaign for one target

class Campaign:
    def __init__(self, args, target_name, findings, workdir):
        self.args, self.target_name, self.findings, self.workdir = args, target_name, findings, workdir
        self.rng = random.Random(f"{args.seed}:{target_name}")
        self.stats = collections.Counter()
        self.target = None
        self.runner = None
        self.baseline = None
        self.mem_base = None
        self.pool = []

    def log(self, msg):
        if not self.args.quiet:
            print(f"[{self.target_name} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # -- process lifecycle ----------------------------------------------------------

    def start(self):
        self.target = TARGETS[self.target_name](self.args.binary, self.workdir, self.log)
        self.target.start()
        self.runner = Runner(self.target, self.stats)
        self.rebaseline()

    def rebaseline(self):
        ok, why = self.target.honest()  # warms up the honest client's connections
        if not ok:
            raise RuntimeError(f"{self.target_name}: honest client refused right after start: {why}\n"
                               f"{self.target.log_tail()}")
        _, self.baseline = settle(self.target, {"fds": 0, "threads": 0}, deadline_s=1.0, stable_s=0.3, patience_s=0)
        self.mem_base = None

    def restart(self, why):
        self.stats["restarts"] += 1
        self.log(f"restarting: {why}")
        problem = self.target.stop()
        if problem and why != "crash":
            self.findings.add(self.target_name, "shutdown", f"after {why}: {problem}", self.last_batch or [])
        self.target.close()
        self.target.start()
        self.runner = Runner(self.target, self.stats)
        self.rebaseline()

    def stop(self):
        if self.target is not None:
            problem = self.target.stop()
            if problem:
                self.findings.add(self.target_name, "shutdown", problem, self.last_batch or [])
            self.target.close()
            shutil.rmtree(self.target.workdir, ignore_errors=True)

    # -- cases ----------------------------------------------------------------------

    def next_case(self):
        if not self.pool:
            self.pool = list(GENERATORS[self.target_name])
            self.rng.shuffle(self.pool)
        gen = self.pool.pop()
        return gen(random.Random(self.rng.getrandbits(64)), self.target_name)

    def record(self, kind, detail, cases, signature=None, extra=None):
        extra = dict(extra or {})
        extra["log_tail"] = self.target.log_tail(15)
        path = self.findings.add(self.target_name, kind, detail, cases, signature, extra)
        self.log(f"FINDING {kind}: {detail}" + (f"\n    reproducer {os.path.relpath(path, ROOT)}" if path else ""))

    # -- the loop -------------------------------------------------------------------

    def run(self, deadline, iterations):
        self.last_batch = []
        self.start()
        batches = 0
        try:
            while (iterations is None or self.stats["cases"] < iterations) and time.monotonic() < deadline:
                n = self.args.batch if iterations is None else min(self.args.batch, iterations - self.stats["cases"])
                batch = [self.next_case() for _ in range(n)]
                self.last_batch = batch
                self.run_batch(batch)
                batches += 1
                self.stats["batches"] = batches
        finally:
            self.stop()
        return self.stats

    def run_batch(self, batch):
        for i, case in enumerate(batch):
            issues = self.runner.run(case)
            if not self.target.alive():
                self.on_crash(batch[:i + 1])
                return
            for issue in issues:
                self.record(issue.kind, f"{case.name} ({case.tag}): {issue.detail}", [case],
                            signature=re.sub(r"\d+", "N", issue.detail)[:120])
        ok, why = self.target.honest()
        self.stats["honest_checks"] += 1
        if not self.target.alive():
            self.on_crash(batch)
            return
        if not ok:
            self.record("honest-refused", f"after a batch: {why}", batch)
            self.restart("honest client refused")
            return
        at_rest, snap = settle(self.target, {"fds": self.baseline["fds"] + self.args.fd_slack,
                                             "threads": self.baseline["threads"] + self.args.thread_slack})
        restart = None
        if not at_rest:
            restart = self.on_leak(batch, snap)
        problem = self.target.quiescent_problem()
        if problem:
            self.record("queue-leak", problem, batch)
            restart = restart or "queue leak"
        restart = self.check_memory(batch) or restart
        if restart:
            self.restart(restart)

    # -- crash ----------------------------------------------------------------------

    def on_crash(self, cases):
        how = self.target.exit_description()
        self.stats["crashes"] += 1
        tail = self.target.log_tail(25)
        culprit = None
        for case in cases:  # which case alone kills a fresh process?
            self.target.close()
            self.target.start()
            self.runner = Runner(self.target, self.stats)
            self.runner.run(case)
            if not self.target.alive():
                culprit = case
                break
        self.record("crash", f"{how}", [culprit] if culprit else cases,
                    signature=culprit.name if culprit else None,
                    extra={"crash_log_tail": tail, "isolated": culprit is not None})
        if self.target.alive():
            self.target.stop()
        self.target.close()
        self.target.start()
        self.runner = Runner(self.target, self.stats)
        self.rebaseline()
        self.stats["restarts"] += 1

    # -- leaks ----------------------------------------------------------------------

    def on_leak(self, batch, snap):
        grew = {k: snap[k] - self.baseline[k] for k in ("fds", "threads")}
        self.log(f"process did not come back to rest after the batch: {grew}, new descriptors "
                 f"{kinds_diff(self.baseline, snap)}; isolating")
        found = False
        for case in batch:
            res = self.isolate(case)
            if res is None:
                continue
            if res == "crash":
                return "crash"
            metric, per_run, kinds = res
            found = True
            kind = "fd-leak" if metric == "fds" else "thread-leak"
            self.record(kind, f"{case.name} ({case.tag}): {per_run:.1f} {metric} per run left open after the "
                              f"connections closed; leaked {kinds}", [case],
                        signature=tuple(sorted(kinds)) if kinds else metric,
                        extra={"leaked_per_run": per_run, "leaked_kinds": kinds})
        if not found:
            # Not one case alone: replay the whole batch to see if it grows again.
            _, before = settle(self.target, self.target.snapshot(), deadline_s=0.5, patience_s=0)
            for case in batch:
                self.runner.run(case)
            at_rest, after = settle(self.target, before)
            if not at_rest and after["fds"] - before["fds"] > self.args.fd_slack:
                self.record("fd-leak", f"batch of {len(batch)} cases (no single case): "
                                       f"+{after['fds'] - before['fds']} fds, {kinds_diff(before, after)}", batch)
            else:
                self.stats["unattributed_growth"] += 1
        return "leak"

    def isolate(self, case, repeats=3):
        """Runs one case alone; if the process keeps descriptors or threads it had not
        before, runs it `repeats` more times: a leak grows with every run."""
        _, before = settle(self.target, self.target.snapshot(), deadline_s=0.3, stable_s=0.1, patience_s=0)
        self.runner.run(case)
        if not self.target.alive():
            self.on_crash([case])
            return "crash"
        at_rest, one = settle(self.target, before)
        if at_rest:
            return None
        for _ in range(repeats):
            self.runner.run(case)
        _, after = settle(self.target, before)
        runs = repeats + 1
        for metric in ("fds", "threads"):
            total = after[metric] - before[metric]
            if total >= runs and after[metric] > one[metric]:
                return metric, total / runs, kinds_diff(before, after)
        return None

    # -- memory ---------------------------------------------------------------------

    def check_memory(self, batch):
        snap = self.target.snapshot()
        if self.mem_base is None:  # first batch after a start: arenas and stack caches fill
            self.mem_base = snap
            return None
        vm = (snap["vm_kib"] - self.mem_base["vm_kib"]) >> 10
        maps = snap["maps"] - self.mem_base["maps"]
        if vm <= self.args.vm_slack_mib and maps <= self.args.maps_slack:
            return None
        self.log(f"mapped memory grew by {vm} MiB / {maps} mappings since the first batch; isolating")
        for case in batch:
            s0 = self.target.snapshot()
            runs = 4
            for _ in range(runs):
                self.runner.run(case)
                if not self.target.alive():
                    self.on_crash([case])
                    return None
            settle(self.target, s0)
            s1 = self.target.snapshot()
            dvm, dmaps = (s1["vm_kib"] - s0["vm_kib"]) >> 10, s1["maps"] - s0["maps"]
            if dvm >= 4 * runs or dmaps >= 2 * runs:
                self.record("memory-leak", f"{case.name} ({case.tag}): +{dvm} MiB VmSize, +{dmaps} mappings "
                                           f"over {runs} runs", [case], signature=case.name)
                return "memory leak"
        self.stats["unattributed_growth"] += 1
        self.mem_base = self.target.snapshot()
        return None


# ======================================================================================
# Replay

def replay(args):
    lines = [json.loads(l) for l in open(args.replay) if l.strip()]
    header = lines[0] if "finding" in lines[0] else {}
    target_name = header.get("target") or args.target
    if target_name not in TARGETS:
        sys.exit("say --target daemon|lane (the file has no header naming one)")
    cases = collections.OrderedDict()
    for l in lines:
        if "name" in l and "case" in l:
            cases[l["case"]] = Case(l["name"], [], l.get("tag", ""))
        elif "step" in l:
            cases[l["case"]].steps.append(l["step"])
    workdir = tempfile.mkdtemp(prefix="cfz-replay-", dir="/tmp")
    stats = collections.Counter()
    target = TARGETS[target_name](args.binary, workdir, print)
    target.start()
    print(f"replaying {len(cases)} case(s) of {args.replay} against a fresh {target_name} (pid {target.pid}), "
          f"{args.repeat} time(s)")
    if header:
        print(f"recorded: {header['finding']}: {header['detail']}")
    try:
        ok, why = target.honest()
        _, before = settle(target, {"fds": 0, "threads": 0}, deadline_s=1.0, stable_s=0.3, patience_s=0)
        runner = Runner(target, stats)
        issues = []
        for _ in range(args.repeat):
            for case in cases.values():
                issues += runner.run(case)
                if not target.alive():
                    break
            if not target.alive():
                break
        reproduced = False
        if not target.alive():
            print(f"CRASH: {target.exit_description()}\n{target.log_tail()}")
            reproduced = True
        else:
            ok, why = target.honest()
            at_rest, after = settle(target, before)
            print(f"descriptors {before['fds']} -> {after['fds']} {kinds_diff(before, after)}; threads "
                  f"{before['threads']} -> {after['threads']}; VmSize {before['vm_kib'] >> 10} -> "
                  f"{after['vm_kib'] >> 10} MiB; maps {before['maps']} -> {after['maps']}")
            print(f"honest client: {'served' if ok else 'REFUSED: ' + why}")
            problem = target.quiescent_problem()
            if problem:
                print(f"QUEUE LEAK: {problem}")
            reproduced = not at_rest or not ok or bool(problem)
            if not at_rest:
                print(f"LEAK: {after['fds'] - before['fds']} descriptor(s), {after['threads'] - before['threads']} "
                      f"thread(s) over {args.repeat} run(s)")
        for i in issues:
            print(f"{i.kind.upper()}: {i.detail}")
            reproduced = True
        print("reproduced" if reproduced else "not reproduced")
        return 1 if reproduced else 0
    finally:
        target.stop()
        target.close()
        shutil.rmtree(workdir, ignore_errors=True)


# ======================================================================================

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=["daemon", "lane", "both"], default="both")
    p.add_argument("--seed", type=int, default=None, help="RNG seed (default: random, printed)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--iterations", type=int, help="cases per target")
    g.add_argument("--seconds", type=float, help="wall time per target (default 20)")
    p.add_argument("--binary", default=os.environ.get("ACCELGATE_BIN") or DEFAULT_BINARY,
                   help="accelgate binary (default $ACCELGATE_BIN or .build/debug/accelgate)")
    p.add_argument("--batch", type=int, default=0, help="cases between oracle checks (default: one of each generator)")
    p.add_argument("--fd-slack", type=int, default=4, help="descriptors above baseline tolerated after a batch")
    p.add_argument("--thread-slack", type=int, default=2)
    p.add_argument("--vm-slack-mib", type=int, default=2048)
    p.add_argument("--maps-slack", type=int, default=400)
    p.add_argument("--replay", metavar="FILE", help="replay a reproducer (JSON lines) against a fresh process")
    p.add_argument("--repeat", type=int, default=5, help="--replay: runs of the recorded cases")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if not os.access(args.binary, os.X_OK):
        sys.exit(f"{args.binary} is missing or not executable (build it, or pass --binary / set ACCELGATE_BIN)")
    if args.replay:
        sys.exit(replay(args))
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    targets = ["daemon", "lane"] if args.target == "both" else [args.target]
    seconds = args.seconds if args.seconds is not None else (None if args.iterations else 20.0)
    findings = Findings(args.seed, args.binary)
    workdir = tempfile.mkdtemp(prefix="cfz-", dir="/tmp")  # short: Unix socket paths are limited to 108 bytes
    os.chmod(workdir, 0o750)
    print(f"control_fuzz: seed {args.seed}, targets {targets}, "
          f"{f'{seconds:.0f} s' if seconds else f'{args.iterations} cases'} each, binary {args.binary}", flush=True)
    results = {}
    t0 = time.monotonic()
    try:
        for name in targets:
            if not args.batch:
                args.batch = len(GENERATORS[name])
            camp = Campaign(args, name, findings, workdir)
            deadline = time.monotonic() + seconds if seconds else float("inf")
            started = time.monotonic()
            stats = camp.run(deadline, None if seconds else args.iterations)
            stats["seconds"] = round(time.monotonic() - started, 1)
            stats.update({f"grpc_{k}": v for k, v in camp.target.stats_grpc.items()})
            results[name] = stats
            args.batch = 0 if args.batch == len(GENERATORS[name]) else args.batch
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n==== control_fuzz summary (seed {args.seed}, {time.monotonic() - t0:.1f} s) ====")
    keys = ["seconds", "cases", "batches", "connections", "messages", "replies", "server_closes", "fds_passed",
            "bytes_sent", "honest_checks", "grpc_calls", "restarts", "crashes", "unattributed_growth"]
    for name, st in results.items():
        print(f"{name}: " + ", ".join(f"{k}={st.get(k, 0)}" for k in keys))
        g = {k[5:]: v for k, v in st.items() if k.startswith("grpc_") and k != "grpc_calls"}
        if g:
            print(f"  gRPC statuses: {dict(sorted(g.items()))}")
    if findings.counts:
        print("findings (occurrences; distinct):")
        for (tname, kind), n in sorted(findings.counts.items()):
            distinct = [(sig, e) for sig, e in findings.unique.items() if sig[0] == tname and sig[1] == kind]
            print(f"  {tname} {kind}: {n} occurrence(s), {len(distinct)} distinct")
            for sig, e in distinct:
                where = os.path.relpath(e["file"], ROOT) if e["file"] else "(not written: enough of this kind)"
                print(f"    - [{sig[2]}] x{e['occurrences']}: {_short(e['detail'], 220)}\n      {where}")
        return 1
    print("no findings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
