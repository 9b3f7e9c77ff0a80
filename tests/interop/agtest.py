"""Shared helpers for the AccelGate interop tests (payloads, reference codecs, call wrappers).

conftest.py generates the stubs and puts them on sys.path before test modules
(and so this module) are imported.
"""
import gzip
import hashlib
import io
import os
import random
import secrets
import signal
import struct
import time
import zlib
from dataclasses import dataclass, field

import grpc

from accelgate.v1 import accelerator_pb2 as pb

KiB = 1 << 10
MiB = 1 << 20
DEFAULT_MAX_REQUEST = 4 * MiB
DEFAULT_MAX_DECOMPRESSED = 4 * MiB
DEFAULT_LEVEL = 6
RETRY_AFTER = "retry-after-ms"

DEFLATE = pb.COMPRESSION_FORMAT_DEFLATE
ZLIB = pb.COMPRESSION_FORMAT_ZLIB
GZIP = pb.COMPRESSION_FORMAT_GZIP
FORMATS = {"deflate": DEFLATE, "zlib": ZLIB, "gzip": GZIP}
FORMAT_NAMES = {v: k for k, v in FORMATS.items()}

# Default per-call timeout for calls to the fast session server.
CALL_TIMEOUT_S = 60.0

# ----------------------------------------------------------------------------------------
# Payloads

_WORDS = (
    "the of and to in is was for that with as on by at from this be are or it an which "
    "accelerator queue engine descriptor doorbell completion compress decompress payload "
    "stream header trailer checksum deadline tenant buffer memory device driver request "
    "response service limit window huffman literal distance length block stored dynamic "
    "fixed server client network latency throughput batch ring submission pool record"
).split()


def text_bytes(n: int, seed: int = 1) -> bytes:
    """Deterministic English-ish text: word salad with punctuation and line breaks."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
        sentence = " ".join(words).capitalize() + rng.choice([". ", ". ", "? ", "! ", ".\n"])
        out += sentence.encode()
    return bytes(out[:n])


# ----------------------------------------------------------------------------------------
# Reference codecs (Python's zlib and gzip)

WBITS = {DEFLATE: -15, ZLIB: 15, GZIP: 31}


def py_compress(fmt: int, data: bytes, level: int = 6) -> bytes:
    co = zlib.compressobj(level, zlib.DEFLATED, WBITS[fmt])
    return co.compress(data) + co.flush()


def py_decompress_strict(fmt: int, data: bytes) -> bytes:
    """Decompresses one complete stream and insists on nothing after it.

    For GZIP a single member is expected (the service writes one member)."""
    d = zlib.decompressobj(WBITS[fmt])
    out = d.decompress(data)
    out += d.flush()
    assert d.eof, f"{FORMAT_NAMES[fmt]} stream from the service is incomplete (Python saw no end of stream)"
    assert d.unused_data == b"", f"{len(d.unused_data)} bytes after the end of the {FORMAT_NAMES[fmt]} stream"
    if fmt == GZIP:
        assert gzip.decompress(data) == out
    return out


def py_rejects(fmt: int, data: bytes) -> bool:
    """True if zlib (the reference decoder) refuses `data` as a complete stream of `fmt`:
    an error, no end of stream, or bytes left over. GZIP is one or more members back to
    back, each checked by zlib (which, unlike Python's gzip module, also checks reserved
    header flags)."""
    rest = data
    while True:
        d = zlib.decompressobj(WBITS[fmt])
        try:
            d.decompress(rest)
            d.flush()
        except zlib.error:
            return True
        if not d.eof:
            return True
        rest = d.unused_data
        if fmt != GZIP or not rest:
            return rest != b""


def gzip_with_filename(data: bytes, filename: str = "report-2024.txt", level: int = 9) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename=filename, mode="wb", fileobj=buf, compresslevel=level, mtime=1700000000) as f:
        f.write(data)
    out = buf.getvalue()
    assert out[3] & 0x08, "GzipFile did not write FNAME"
    return out


def stored_deflate(data: bytes, block: int = 65535) -> bytes:
    """Raw DEFLATE made only of stored blocks (5 bytes of overhead per block)."""
    out = bytearray()
    chunks = [data[i:i + block] for i in range(0, len(data), block)] or [b""]
    for i, c in enumerate(chunks):
        final = 1 if i == len(chunks) - 1 else 0
        out += bytes([final]) + struct.pack("<HH", len(c), len(c) ^ 0xFFFF) + c
    return bytes(out)


ZLIB_HEADER = b"\x78\x9c"
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


def wrap(fmt: int, raw: bytes, *, adler: int = None, crc: int = None, size: int = None,
         original: bytes = None) -> bytes:
    """Wraps a raw DEFLATE body as `fmt`. Checksums come from `original` unless given."""
    if fmt == DEFLATE:
        return raw
    if fmt == ZLIB:
        if adler is None:
            adler = zlib.adler32(original)
        return ZLIB_HEADER + raw + struct.pack(">I", adler & 0xFFFFFFFF)
    if crc is None:
        crc = zlib.crc32(original)
    if size is None:
        size = len(original)
    return GZIP_HEADER + raw + struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF)


def zero_bomb_raw(total: int, chunk: int = MiB):
    """Raw DEFLATE of `total` zero bytes, built streaming; returns (raw, adler32, crc32)."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(chunk)
    parts = []
    adler, crc = 1, 0
    left = total
    while left:
        c = zeros if left >= chunk else zeros[:left]
        parts.append(co.compress(c))
        adler = zlib.adler32(c, adler)
        crc = zlib.crc32(c, crc)
        left -= len(c)
    parts.append(co.flush())
    return b"".join(parts), adler, crc


class BitWriter:
    """LSB-first bit writer for hand-made DEFLATE streams."""

    def __init__(self):
        self.bits = []

    def put(self, value: int, n: int):
        for i in range(n):
            self.bits.append((value >> i) & 1)

    def put_huffman(self, code: int, n: int):
        for i in reversed(range(n)):  # Huffman codes are sent most significant bit first
            self.bits.append((code >> i) & 1)

    def getvalue(self) -> bytes:
        out = bytearray()
        for i in range(0, len(self.bits), 8):
            byte = 0
            for j, b in enumerate(self.bits[i:i + 8]):
                byte |= b << j
            out.append(byte)
        return bytes(out)


def fixed_block_distance_too_far() -> bytes:
    """A final fixed-Huffman block whose first symbol copies from distance 1 with no
    output yet: well-formed bits, invalid stream ("distance too far back")."""
    w = BitWriter()
    w.put(1, 1)             # BFINAL
    w.put(1, 2)             # BTYPE = 01, fixed Huffman
    w.put_huffman(0b0000001, 7)  # literal/length symbol 257: length 3
    w.put_huffman(0, 5)          # distance code 0: distance 1
    w.put_huffman(0, 7)          # symbol 256: end of block
    return w.getvalue()


# ----------------------------------------------------------------------------------------
# Calls


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str = ""
    trailing: dict = field(default_factory=dict)
    response: object = None
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    def describe(self) -> str:
        return f"{self.code.name} {self.details!r} trailing={self.trailing} after {self.elapsed:.2f} s"


def call(method, request, timeout=CALL_TIMEOUT_S, metadata=None) -> Outcome:
    """Runs a unary call and returns its outcome instead of raising."""
    start = time.monotonic()
    try:
        response, c = method.with_call(request, timeout=timeout, metadata=metadata)
        return Outcome(grpc.StatusCode.OK, "", dict(c.trailing_metadata() or ()), response,
                       time.monotonic() - start)
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "", dict(e.trailing_metadata() or ()), None,
                       time.monotonic() - start)


def expect_error(outcome: Outcome, code: grpc.StatusCode, *, retry_hint: bool = False, what: str = "") -> None:
    where = f" for {what}" if what else ""
    assert outcome.code == code, f"expected {code.name}{where}, got {outcome.describe()}"
    assert outcome.details.strip(), f"{code.name}{where} carries no message"
    if retry_hint:
        assert RETRY_AFTER in outcome.trailing, f"{code.name}{where} lacks {RETRY_AFTER}: {outcome.describe()}"
    else:
        assert RETRY_AFTER not in outcome.trailing, \
            f"{RETRY_AFTER} must only be sent on admission rejections{where}: {outcome.describe()}"


_HEALTH = text_bytes(8 * KiB, seed=99)


def assert_serves(stub, timeout=CALL_TIMEOUT_S, what: str = "") -> None:
    """A normal Compress+Decompress round trip must succeed right now."""
    c = call(stub.Compress, pb.CompressRequest(format=GZIP, data=_HEALTH), timeout)
    assert c.ok, f"server stopped serving{(' after ' + what) if what else ''}: Compress -> {c.describe()}"
    assert gzip.decompress(c.response.data) == _HEALTH
    d = call(stub.Decompress, pb.DecompressRequest(format=GZIP, data=c.response.data), timeout)
    assert d.ok, f"server stopped serving{(' after ' + what) if what else ''}: Decompress -> {d.describe()}"
    assert d.response.data == _HEALTH


def wait_until_serves(stub, within_s: float = 60.0, what: str = "") -> float:
    """For slow servers: retries a tiny call while the device drains (deadline or queue-full
    answers only) and returns the time it took. Any other failure fails at once."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < within_s:
        o = call(stub.Compress, pb.CompressRequest(format=GZIP, data=b"ping"), timeout=within_s)
        if o.ok:
            assert gzip.decompress(o.response.data) == b"ping"
            return time.monotonic() - start
        assert o.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED), \
            f"server unhealthy{(' after ' + what) if what else ''}: {o.describe()}"
        last = o
        time.sleep(0.2)
    raise AssertionError(f"server did not serve within {within_s} s{(' after ' + what) if what else ''}; "
                         f"last: {last.describe() if last else None}")


def check_stats(stats, *, input_bytes: int, output_bytes: int, queues: int = 2, engines: int = 2) -> None:
    assert stats.input_bytes == input_bytes, f"stats.input_bytes {stats.input_bytes} != {input_bytes}"
    assert stats.output_bytes == output_bytes, f"stats.output_bytes {stats.output_bytes} != {output_bytes}"
    if input_bytes > 0:
        assert stats.device_ns > 0, "stats.device_ns is 0 for a non-empty job"
    assert stats.total_ns > 0, "stats.total_ns is 0"
    assert stats.total_ns >= stats.queue_wait_ns, f"total_ns {stats.total_ns} < queue_wait_ns {stats.queue_wait_ns}"
    assert stats.total_ns >= stats.device_ns, f"total_ns {stats.total_ns} < device_ns {stats.device_ns}"
    assert stats.total_ns < 120 * 10**9, f"total_ns {stats.total_ns} is implausible"
    assert stats.queue_id < queues, f"queue_id {stats.queue_id} but the server has {queues} queues"
    assert stats.engine_id < engines, f"engine_id {stats.engine_id} but the server has {engines} engines"
    assert stats.batch_size >= 1, "batch_size is 0"
    assert stats.engine, "stats.engine is empty"


# ----------------------------------------------------------------------------------------
# Tenants

REJECTION_REASON = "rejection-reason"


def key_hash(key: str) -> str:
    """The api_key_sha256 entry for `key` (what `accelgate hash-key` prints)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(label: str = "k") -> str:
    """A fresh random API key; the label makes it easy to spot in a log."""
    return f"{label}-{secrets.token_urlsafe(24)}"


def bearer(key: str):
    """Call metadata carrying `key`."""
    return (("authorization", f"Bearer {key}"),)


@dataclass
class Tenant:
    id: str
    keys: list
    weight: int = None
    limits: dict = field(default_factory=dict)

    @property
    def md(self):
        return bearer(self.keys[0])


def tenants_yaml(tenants) -> str:
    lines = ["tenants:"]
    for t in tenants:
        lines.append(f"  - id: {t.id}")
        if t.weight is not None:
            lines.append(f"    weight: {t.weight}")
        lines.append(f"    api_key_sha256: [{', '.join(key_hash(k) for k in t.keys)}]")
        if t.limits:
            lines.append("    limits:")
            lines += [f"      {name}: {value}" for name, value in t.limits.items()]
    return "\n".join(lines) + "\n"


def write_tenants(path: str, tenants=None, *, text: str = None) -> str:
    """Writes a tenants file atomically (a reload never sees half a file); returns path."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text if text is not None else tenants_yaml(tenants))
    os.replace(tmp, path)
    return path


def _log_text(srv) -> str:
    with open(srv.log_path, "rb") as f:
        return f.read().decode(errors="replace")


def _reload_lines(srv):
    return [line for line in _log_text(srv).splitlines() if "reload" in line and "tenants" in line]


def sighup_and_wait(srv, *, ok: bool = True, within_s: float = 15.0) -> str:
    """Sends SIGHUP and waits for the server's log line about the reload. Returns it;
    fails if the reload did not log, or logged the other outcome than `ok`."""
    before = len(_reload_lines(srv))
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        lines = _reload_lines(srv)
        if len(lines) > before:
            line = lines[before]
            failed = "error" in line.lower() or "fail" in line.lower()
            assert failed != ok, f"expected a {'successful' if ok else 'failed'} reload, the server logged: {line}"
            return line
        assert srv.alive(), f"server died on SIGHUP\n{srv.log_tail()}"
        time.sleep(0.02)
    raise AssertionError(f"no reload line in the server log within {within_s} s of SIGHUP\n{srv.log_tail()}")


def device_jobs(stub, metadata=None):
    """(jobs run by all engines, jobs completed by all queues) from DescribeDevice."""
    o = call(stub.DescribeDevice, pb.DescribeDeviceRequest(), timeout=30, metadata=metadata)
    assert o.ok, f"DescribeDevice -> {o.describe()}"
    return sum(e.jobs for e in o.response.engines), sum(q.completed for q in o.response.queues)


def wait_device_idle(stub, metadata=None, within_s: float = 30.0):
    """Waits until no descriptor is in flight and the job counters stop moving."""
    deadline = time.monotonic() + within_s
    last = None
    while time.monotonic() < deadline:
        o = call(stub.DescribeDevice, pb.DescribeDeviceRequest(), timeout=30, metadata=metadata)
        assert o.ok, f"DescribeDevice -> {o.describe()}"
        now = (sum(e.jobs for e in o.response.engines), sum(q.completed for q in o.response.queues))
        if all(q.in_flight == 0 for q in o.response.queues) and now == last:
            return now
        last = now
        time.sleep(0.2)
    raise AssertionError(f"device still busy after {within_s} s")
