"""A Python client for AccelGate's local lane, written from docs/LOCAL_LANE.md
(independent of the Swift client library): register a sealed memfd over the
control socket (SCM_RIGHTS), then name spans of it in gRPC calls made over the
gateway's Unix socket."""
import fcntl
import json
import mmap
import os
import socket
import struct

from agtest import pb


def _recv_exact(sock, n):
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("control socket closed")
        out += chunk
    return bytes(out)


class Region:
    def __init__(self, token, mm, fd, size, reply):
        self.token, self.mm, self.fd, self.size, self.reply = token, mm, fd, size, reply

    def span(self, offset, length):
        return pb.RegionSpan(region=self.token, offset=offset, length=length)

    def write(self, offset, data):
        self.mm[offset:offset + len(data)] = data

    def read(self, offset, length):
        return bytes(self.mm[offset:offset + length])


class ControlChannel:
    """One connection to the local control socket; regions passed on it are
    unregistered by the gateway when it closes."""

    def __init__(self, path, api_key=None, timeout=30):
        self.api_key = api_key
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def call(self, request, fds=()):
        if self.api_key is not None and "api_key" not in request:
            request = dict(request, api_key=self.api_key)
        body = json.dumps(request).encode()
        frame = struct.pack("<I", len(body)) + body
        if fds:
            socket.send_fds(self.sock, [frame], list(fds))
        else:
            self.sock.sendall(frame)
        (n,) = struct.unpack("<I", _recv_exact(self.sock, 4))
        return json.loads(_recv_exact(self.sock, n))

    def register(self, size, *, seal=True, file_size=None, claim=None, expect_ok=True):
        """Creates a memfd of `file_size` (default `size`) bytes, seals it against
        shrinking unless told not to, maps it, and registers `claim` (default `size`) bytes."""
        fd = os.memfd_create("accelgate-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, file_size if file_size is not None else size)
        if seal:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        mm = mmap.mmap(fd, file_size if file_size is not None else size)
        reply = self.call({"op": "register", "size": claim if claim is not None else size}, [fd])
        if expect_ok:
            assert reply.get("ok"), f"register refused: {reply}"
        return Region(reply.get("region"), mm, fd, size, reply)

    def unregister(self, region):
        return self.call({"op": "unregister", "region": region.token if isinstance(region, Region) else region})

    def close(self):
        self.sock.close()
