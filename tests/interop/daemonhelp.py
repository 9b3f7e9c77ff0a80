"""Helpers for tests of the standalone device daemon (`accelgate device`).

* ``DeviceDaemon``  one `accelgate device --socket PATH` process; its output goes to
                    .build-interop/logs/dNNN-<label>.log (beside the gateways' logs).
* ``Control``       a raw connection to the daemon's Unix-socket control channel:
                    frames are a little-endian u32 length and a JSON object; an
                    `alloc` reply carries the queue's memfd as SCM_RIGHTS.
* ``queue_count``, ``wait_queue_count``: the daemon's live queues, as `capabilities`
                    reports them on a fresh connection.

Every socket call has a timeout, so a daemon that stops answering fails a test
instead of hanging it.
"""
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import LOG_DIR, ROOT, server_binary

def _abi_header_number(name):
    """A version number as the ABI's C header (the source of truth) defines it."""
    import re as _re
    text = open(os.path.join(ROOT, "Sources", "CAccelABI", "include", "accel_abi.h")).read()
    return int(_re.search(rf"#define {name}\s+(\d+)u", text).group(1))


ABI_MAJOR = _abi_header_number("ACCEL_ABI_VERSION_MAJOR")
ABI_MINOR = _abi_header_number("ACCEL_ABI_VERSION_MINOR")
ABI_VERSION = (ABI_MAJOR << 16) | ABI_MINOR
REGION_MAGIC = b"ACCL"
HEADER_SIZE = 4096
MAX_FRAME = 64 * 1024

STARTUP_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 20.0
# `accelgate device` prints its listening line before it installs its SIGTERM handler,
# so a SIGTERM in the first few milliseconds kills it with the default action. That is
# reported once, by test_sigterm_right_after_listening_line_stops_cleanly; other tests
# stop their daemons no sooner than this after the line so it does not fail them at random.
SETTLE_S = 0.3
IO_TIMEOUT_S = 10.0

_counter_lock = threading.Lock()
_counter = [0]


def _next_index() -> int:
    with _counter_lock:
        _counter[0] += 1
        return _counter[0]


def short_tmpdir(prefix: str = "agd-") -> str:
    """A fresh directory directly under /tmp: Unix socket paths are limited to 108
    bytes, which pytest's tmp_path can exceed."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


class DeviceDaemon:
    """One `accelgate device` process."""

    def __init__(self, socket_path: str, flags=(), label: str = "device", umask: int = None):
        self.path = socket_path
        self.flags = [str(f) for f in flags]
        self.label = label
        self.umask = umask
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:80]
        self.log_path = os.path.join(LOG_DIR, f"d{_next_index():03d}-{safe}.log")
        self.proc = None
        self._log = None
        self._pump = None
        self.stopped = False
        self.expected_death = False
        self.ready_at = None

    @property
    def address(self) -> str:
        return f"unix://{self.path}"

    def start(self) -> "DeviceDaemon":
        binary = server_binary()
        if not os.access(binary, os.X_OK):
            pytest.fail(f"binary {binary!r} is missing or not executable (set ACCELGATE_BIN)", pytrace=False)
        argv = [binary, "device", "--socket", self.path, *self.flags]
        os.makedirs(LOG_DIR, exist_ok=True)
        self._log = open(self.log_path, "wb", buffering=0)
        self._log.write(("$ " + " ".join(argv) + "\n").encode())
        extra = {} if self.umask is None else {"umask": self.umask}
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, **extra)
        want = f"accelgate device listening on {self.path}".encode()
        found = threading.Event()
        listening = [False]

        def pump():
            for line in iter(self.proc.stdout.readline, b""):
                self._log.write(line)
                if not listening[0] and want in line:
                    listening[0] = True
                    found.set()
            found.set()  # EOF: the process ended

        self._pump = threading.Thread(target=pump, name=f"log-{self.label}", daemon=True)
        self._pump.start()
        if not found.wait(STARTUP_TIMEOUT_S):
            self.kill()
            pytest.fail(f"device {self.label!r} printed no listening line within {STARTUP_TIMEOUT_S:.0f} s\n"
                        f"{self.log_tail()}", pytrace=False)
        if not listening[0]:
            self.kill()
            pytest.fail(f"device {self.label!r} exited with {self.proc.returncode} before listening\n"
                        f"{self.log_tail()}", pytrace=False)
        self.ready_at = time.monotonic()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, settle: bool = True) -> None:
        """SIGTERM; fails if the daemon had died, hangs, or exits non-zero.
        settle=False sends it at once, even right after the listening line (see SETTLE_S)."""
        if self.stopped or self.proc is None:
            return
        self.stopped = True
        died = None if self.alive() else self.proc.returncode
        hung = False
        if died is None:
            if settle and self.ready_at is not None:
                time.sleep(max(0.0, self.ready_at + SETTLE_S - time.monotonic()))
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                hung = True
                self.kill()
        self._pump.join(5)
        self._log.write(f"[interop] exit status {self.proc.returncode}\n".encode())
        self._log.close()
        if died is not None and not self.expected_death:
            raise AssertionError(f"device {self.label!r} died during the test (exit status {died}); "
                                 f"log {self.log_path}\n{self.log_tail()}")
        if hung:
            raise AssertionError(f"device {self.label!r} did not exit within {SHUTDOWN_TIMEOUT_S:.0f} s of SIGTERM; "
                                 f"log {self.log_path}\n{self.log_tail()}")
        if died is None and self.proc.returncode != 0:
            raise AssertionError(f"device {self.label!r} exited with status {self.proc.returncode} after SIGTERM; "
                                 f"log {self.log_path}\n{self.log_tail()}")

    def log_text(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_text()
        if not text:
            return "(no log)"
        return "---- device log tail ----\n" + "\n".join(text.splitlines()[-lines:])

    def wait_log(self, pattern: str, *, count: int = 1, within_s: float = 10.0) -> list:
        """Waits until `pattern` (a regex) matches at least `count` log lines; returns them."""
        deadline = time.monotonic() + within_s
        while True:
            lines = [ln for ln in self.log_text().splitlines() if re.search(pattern, ln)]
            if len(lines) >= count:
                return lines
            if time.monotonic() > deadline:
                raise AssertionError(f"device log has {len(lines)} line(s) matching {pattern!r} after {within_s} s, "
                                     f"expected {count}\n{self.log_tail()}")
            time.sleep(0.05)


class DaemonFactory:
    """start(*flags, label=..., umask=None) starts a daemon on a fresh socket path."""

    def __init__(self, owner: str):
        self.owner = owner
        self.daemons = []
        self.dirs = []

    def __call__(self, *flags, label: str = "", umask: int = None) -> DeviceDaemon:
        d = short_tmpdir()
        self.dirs.append(d)
        name = f"{self.owner}-{label}" if label else self.owner
        daemon = DeviceDaemon(os.path.join(d, "dev.sock"), flags, label=name, umask=umask)
        self.daemons.append(daemon)
        return daemon.start()

    def stop_all(self) -> None:
        errors = []
        for daemon in self.daemons:
            try:
                daemon.stop()
            except AssertionError as e:
                errors.append(str(e))
        self.daemons.clear()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()
        if errors:
            pytest.fail("\n\n".join(errors), pytrace=False)


class ControlError(AssertionError):
    pass


class Control:
    """A raw control connection. `request` sends one message and returns (reply, fds);
    the caller owns the fds (use `close_fds`)."""

    def __init__(self, path: str, timeout: float = IO_TIMEOUT_S):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.log = []  # (request, reply) pairs, for failure messages

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, message: dict) -> None:
        body = json.dumps(message).encode()
        self.sock.sendall(struct.pack("<I", len(body)) + body)

    def _recv_exact(self, n: int, fds: list) -> bytes:
        buf = b""
        while len(buf) < n:
            data, got, _flags, _addr = socket.recv_fds(self.sock, n - len(buf), 8)
            fds.extend(got)
            if not data:
                raise ControlError(f"control connection closed by the daemon after {len(buf)} of {n} bytes")
            buf += data
        return buf

    def receive(self):
        fds = []
        try:
            header = self._recv_exact(4, fds)
            (length,) = struct.unpack("<I", header)
            if not 0 < length <= MAX_FRAME:
                raise ControlError(f"daemon sent a frame of {length} bytes")
            body = self._recv_exact(length, fds)
            try:
                reply = json.loads(body)
            except ValueError as e:
                raise ControlError(f"daemon sent a frame that is not JSON: {body[:200]!r} ({e})")
            if not isinstance(reply, dict):
                raise ControlError(f"daemon sent a frame that is not a JSON object: {reply!r}")
            return reply, fds
        except BaseException:
            close_fds(fds)
            raise

    def request(self, message: dict):
        self.send(message)
        try:
            reply, fds = self.receive()
        except socket.timeout:
            raise ControlError(f"no reply to {message} within {self.sock.gettimeout()} s")
        self.log.append((message, reply))
        return reply, fds

    def ask(self, message: dict) -> dict:
        """A request that must pass no descriptor."""
        reply, fds = self.request(message)
        close_fds(fds)
        assert not fds, f"request {message}: daemon passed {len(fds)} descriptor(s) with {reply}"
        return reply

    def hello(self, abi: int = ABI_VERSION) -> dict:
        reply = self.ask({"op": "hello", "abi": abi})
        assert reply.get("ok") is True, f"request hello abi={abi:#x}: expected ok, got {reply}"
        return reply

    def alloc(self, weight: int = 1):
        """Allocates a queue; returns (queue id, memfd)."""
        reply, fds = self.request({"op": "alloc", "weight": weight})
        if reply.get("ok") is not True or not isinstance(reply.get("queue"), int) or len(fds) != 1:
            close_fds(fds)
            raise AssertionError(f"request alloc weight={weight}: expected ok with a queue id and one "
                                 f"descriptor, got {reply} with {len(fds)} descriptor(s)")
        return reply["queue"], fds[0]

    def capabilities(self) -> dict:
        reply = self.ask({"op": "capabilities"})
        assert reply.get("ok") is True, f"request capabilities: expected ok, got {reply}"
        return reply


def close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def capabilities(path: str) -> dict:
    """hello + capabilities on a fresh connection."""
    with Control(path) as c:
        c.hello()
        return c.capabilities()


def queue_count(path: str) -> int:
    caps = capabilities(path)
    assert isinstance(caps.get("queues"), int), f"capabilities has no integer 'queues': {caps}"
    return caps["queues"]


def wait_queue_count(path: str, want: int, within_s: float = 10.0, what: str = "") -> float:
    """Polls capabilities until the daemon has `want` queues; returns the time taken."""
    start = time.monotonic()
    while True:
        n = queue_count(path)
        if n == want:
            return time.monotonic() - start
        if time.monotonic() - start > within_s:
            raise AssertionError(f"daemon reports {n} queues {within_s} s {what or 'later'}, expected {want}")
        time.sleep(0.05)
