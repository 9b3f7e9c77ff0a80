"""Fixtures for the AccelGate interop suite.

The suite talks to a real `accelgate serve` process over loopback gRPC.

* ACCELGATE_BIN chooses the server binary (default: <repo>/.build/debug/accelgate).
* Stubs are generated from proto/ by gen_stubs.generate() into .build-interop/stubs.
* Every server's stdout and stderr go to .build-interop/logs/<n>-<label>.log.

Fixtures:
* ``server``        session server with default flags (a ``ServerProcess``).
* ``stub``          a stub on the session server.
* ``start_server``  factory for extra servers with custom flags, stopped after the test
                    (``start_module_server``: stopped after the module).

A server that dies fails the test during which it died (with its log tail); a server
that does not exit cleanly within 20 s of SIGTERM fails the test or session that owns it.
"""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD_DIR = os.path.join(ROOT, ".build-interop")
LOG_DIR = os.path.join(BUILD_DIR, "logs")

sys.path.insert(0, HERE)
import gen_stubs  # noqa: E402

STARTUP_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 20.0
LISTEN_RE = re.compile(rb"accelgate listening on 127\.0\.0\.1:(\d+)")
METRICS_RE = re.compile(rb"accelgate metrics on http://127\.0\.0\.1:(\d+)/metrics")

# Generous client-side limits: a Compress response can reach the compress bound,
# which is a little over the 4 MiB request limit.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
]


def server_binary() -> str:
    return os.environ.get("ACCELGATE_BIN") or os.path.join(ROOT, ".build", "debug", "accelgate")


def _ensure_stubs() -> None:
    out = gen_stubs.generate()
    if out not in sys.path:
        sys.path.insert(0, out)


def pytest_configure(config):
    # Test modules import accelerator_pb2 at collection time, which happens
    # before any fixture runs, so the stubs are generated here, once per session.
    _ensure_stubs()
    os.makedirs(LOG_DIR, exist_ok=True)
    for name in os.listdir(LOG_DIR):
        if name.endswith(".log"):
            os.remove(os.path.join(LOG_DIR, name))


_counter_lock = threading.Lock()
_counter = [0]


def _next_index() -> int:
    with _counter_lock:
        _counter[0] += 1
        return _counter[0]


class ServerDied(AssertionError):
    """The server process ended on its own."""


class ServerProcess:
    """One `accelgate serve --port 0` process and the channels to it."""

    def __init__(self, label: str, flags=(), preexec=None):
        self.label = label
        self.flags = [str(f) for f in flags]
        self.preexec = preexec  # run in the child before exec (a umask, an rlimit)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:80]
        self.log_path = os.path.join(LOG_DIR, f"{_next_index():03d}-{safe}.log")
        self.port = None
        self.metrics_port = None  # /metrics, on a free port unless the flags choose one
        self.proc = None
        self._log = None
        self._pump = None
        self._channels = []
        self._stub = None
        self.stopped = False
        self.death_reported_in = None  # test during which a crash was reported

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> "ServerProcess":
        binary = server_binary()
        if not os.access(binary, os.X_OK):
            pytest.fail(f"server binary {binary!r} is missing or not executable (set ACCELGATE_BIN)", pytrace=False)
        metrics = [] if "--metrics-port" in self.flags else ["--metrics-port", "0"]
        argv = [binary, "serve", "--host", "127.0.0.1", "--port", "0", *metrics, *self.flags]
        self._log = open(self.log_path, "wb", buffering=0)
        self._log.write(("$ " + " ".join(argv) + "\n").encode())
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                     preexec_fn=self.preexec)
        found = threading.Event()

        def pump():
            for line in iter(self.proc.stdout.readline, b""):
                self._log.write(line)
                if self.metrics_port is None:
                    m = METRICS_RE.search(line)
                    if m:
                        self.metrics_port = int(m.group(1))
                if self.port is None:
                    m = LISTEN_RE.search(line)
                    if m:
                        self.port = int(m.group(1))
                        found.set()
            found.set()  # EOF: the process ended

        self._pump = threading.Thread(target=pump, name=f"log-{self.label}", daemon=True)
        self._pump.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not found.wait(0.05):
            if time.monotonic() > deadline:
                self._kill()
                pytest.fail(f"server {self.label!r} printed no listening line within {STARTUP_TIMEOUT_S:.0f} s\n"
                            f"{self.log_tail()}", pytrace=False)
        if self.port is None:
            self._kill()
            pytest.fail(f"server {self.label!r} exited with {self.proc.returncode} before listening\n"
                        f"{self.log_tail()}", pytrace=False)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stops the server with SIGTERM. Fails if it had died before (unless that was
        already reported), does not exit in time, or exits with a non-zero status."""
        if self.stopped:
            return
        died = None if self.alive() else self.proc.returncode
        for ch in self._channels:
            ch.close()
        self._channels.clear()
        hung = False
        if died is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                hung = True
                self._kill()
        self.stopped = True
        self._pump.join(5)
        self._log.write(f"[interop] exit status {self.proc.returncode}\n".encode())
        self._log.close()
        if died is not None:
            if self.death_reported_in is None:
                raise ServerDied(f"server {self.label!r} died during the tests (exit status {died}); "
                                 f"log {self.log_path}\n{self.log_tail()}")
            return
        if hung:
            raise AssertionError(f"server {self.label!r} did not exit within {SHUTDOWN_TIMEOUT_S:.0f} s of SIGTERM; "
                                 f"log {self.log_path}\n{self.log_tail()}")
        if self.proc.returncode != 0:
            raise AssertionError(f"server {self.label!r} exited with status {self.proc.returncode} after SIGTERM; "
                                 f"log {self.log_path}\n{self.log_tail()}")

    def _kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                data = f.read().decode(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "---- server log tail ----\n" + "\n".join(data[-lines:])

    # -- clients -------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self):
        import grpc
        ch = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self._channels.append(ch)
        return ch

    def new_stub(self):
        """A stub on a fresh channel (its own HTTP/2 connection)."""
        from accelgate.v1 import accelerator_pb2_grpc
        return accelerator_pb2_grpc.AcceleratorStub(self.channel())

    def stub(self):
        """The server's shared stub (one channel, created on first use)."""
        if self._stub is None:
            self._stub = self.new_stub()
        return self._stub


@pytest.fixture(scope="session")
def server():
    srv = ServerProcess("main").start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _main_server_must_survive(request):
    """Around every test that uses the session server: it must be running before and
    after. A crash is reported (with the log tail) against the test it happened in."""
    uses = "server" in request.fixturenames or "stub" in request.fixturenames
    if uses:
        srv = request.getfixturevalue("server")
        if srv.death_reported_in is not None:
            pytest.fail(f"the session server is down: it died during {srv.death_reported_in}", pytrace=False)
    yield
    if uses and not srv.alive():
        srv.death_reported_in = request.node.nodeid
        pytest.fail(f"the session server died during {request.node.nodeid} "
                    f"(exit status {srv.proc.returncode}); log {srv.log_path}\n{srv.log_tail()}",
                    pytrace=False)


@pytest.fixture
def stub(server):
    return server.stub()


class ServerFactory:
    def __init__(self, owner: str):
        self.owner = owner
        self.servers = []

    def __call__(self, *flags, label: str = "", preexec=None) -> ServerProcess:
        srv = ServerProcess(f"{self.owner}-{label}" if label else self.owner, flags, preexec=preexec).start()
        self.servers.append(srv)
        return srv

    def stop_all(self) -> None:
        errors = []
        for srv in self.servers:
            try:
                srv.stop()
            except AssertionError as e:
                errors.append(str(e))
        self.servers.clear()
        if errors:
            pytest.fail("\n\n".join(errors), pytrace=False)


@pytest.fixture
def start_server(request):
    """start_server(*flags, label="") starts an extra server; it is stopped (and must
    not have died) when the test ends."""
    factory = ServerFactory(request.node.name)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def start_module_server(request):
    """Like start_server, but the servers live until the end of the module."""
    factory = ServerFactory(request.module.__name__)
    yield factory
    factory.stop_all()
