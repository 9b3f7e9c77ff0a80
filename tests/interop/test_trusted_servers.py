"""Issue 17, finding 14: a client checks who serves a control socket before it talks.

The gateway sends queue requests to its device daemon's socket, and accelctl (the
AccelGateLocal library) sends an API key to a gateway's local control socket. A
user who gets to the socket path first (a stale socket in a shared directory)
would receive them. Both now check the peer with SO_PEERCRED: it must be root,
the client's own user, or a user the client was told to trust.

The impostor below runs as `nobody` (setpriv), so these tests need root.
"""
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, server_binary
from daemonhelp import short_tmpdir
from test_accelctl import ctl_binary

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root and setpriv to run an impostor as another user")

NOBODY = 65534

IMPOSTOR = r"""
import socket, sys, time
path, log = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
s.listen(8)
open(log + ".ready", "w").close()
while True:
    c, _ = s.accept()
    c.settimeout(5)
    got = b""
    try:
        while True:
            b = c.recv(65536)
            if not b:
                break
            got += b
    except OSError:
        pass
    with open(log, "ab") as f:
        f.write(got)
    c.close()
"""


@pytest.fixture
def impostor():
    """A Unix socket served by `nobody`; yields (path, log of every byte it received)."""
    d = short_tmpdir("agi-")
    os.chmod(d, 0o777)
    path, log = os.path.join(d, "sock"), os.path.join(d, "got.log")
    open(log, "wb").close()
    os.chmod(log, 0o666)
    p = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                          sys.executable, "-c", IMPOSTOR, path, log])
    t0 = time.monotonic()
    while not os.path.exists(log + ".ready") and time.monotonic() - t0 < 20:
        time.sleep(0.02)
    assert os.path.exists(log + ".ready"), "the impostor did not start"
    try:
        yield path, log
    finally:
        p.kill()
        p.wait()
        shutil.rmtree(d, ignore_errors=True)


def test_accelctl_sends_no_api_key_to_a_control_socket_served_by_another_user(impostor, tmp_path):
    path, log = impostor
    src = tmp_path / "in.txt"
    src.write_bytes(b"secret-bearing request\n" * 100)
    # accelctl's unix: target uses PATH.ctl for the local lane's control socket.
    os.symlink(path, path + ".ctl")
    p = subprocess.run([ctl_binary(), "compress", "-t", f"unix:{path}", "--api-key", "agk-must-not-leak",
                        "--format", "gzip", "-i", str(src), "-o", str(tmp_path / "out.gz")],
                       capture_output=True, timeout=60)
    assert p.returncode != 0
    assert f"uid {NOBODY}".encode() in p.stderr, p.stderr.decode()
    time.sleep(0.2)  # let the impostor write what it got (an absence: nothing)
    assert b"agk-must-not-leak" not in open(log, "rb").read()


def test_a_gateway_does_not_take_a_device_socket_served_by_another_user(impostor, tmp_path):
    path, log = impostor
    p = subprocess.Popen([server_binary(), "serve", "--port", "0", "--no-metrics", "--device", f"unix://{path}"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out = b""
        t0 = time.monotonic()
        while f"uid {NOBODY}".encode() not in out and time.monotonic() - t0 < 30:
            if p.poll() is not None:
                out += p.stdout.read()
                break
            line = p.stdout.readline()
            out += line
        assert f"uid {NOBODY}".encode() in out, out.decode()
        assert b"refusing" in out
        # It sent no request (not even hello) to the impostor.
        assert open(log, "rb").read() == b""
    finally:
        p.kill()
        p.wait()
