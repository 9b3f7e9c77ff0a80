#!/usr/bin/env python3
"""Fuzzer for AccelGate's public gRPC API.

Every RPC a client can reach on the gRPC port: accelgate.v1.Accelerator (Compress,
Decompress, DescribeDevice, Encrypt, Decrypt, Digest, Submit, CompressStream,
DecompressStream), grpc.health.v1.Health (Check, Watch) and server reflection (v1 and
v1alpha), plus unknown method paths and raw HTTP/2 frames on a plain socket.

Targets:
* embedded: `accelgate serve` with its embedded device.
* daemon:   `accelgate device --socket PATH` and a gateway `accelgate serve --device
            unix://PATH` attached to it.
Both run with a tenants file (tenants alpha, beta, honest) and a keyring (named keys of
alpha and beta), so API keys and named keys are part of what is fuzzed.

A *case* is a list of steps (unary, stream, chain, parallel, h2raw), produced by a
seeded generator; every request is kept as its serialized bytes (base64 in JSON), so a
case is written out as JSON lines and replayed exactly (`--replay FILE`). All calls go
through generic byte-level channels (no serializer), so valid requests, mutated
messages and random bytes travel the same way.

Oracles, per call: it ends with a gRPC status (a call still running 5 s past its
deadline is a hang); UNKNOWN, and INTERNAL with a message that is not documented, are
findings; a request the generator knows to be valid must succeed (admission
rejections with a retry hint excepted) and its output is checked with independent
libraries (zlib, gzip, zstandard, lz4, cryptography, hashlib); an OK answer to a
request that a reference refuses (a forged tag, a key of another tenant, a missing
API key) is a finding. Per case: the processes are alive. Per batch: an honest client
is served (Health SERVING, a Compress round trip checked with zlib, an AES-256-GCM
Encrypt checked with `cryptography`). A crash is isolated to the case, then to the
single request, that kills a fresh target ("killer request", in the reproducer).

Run `api_fuzz.py --help`; fuzz/api/README.md explains coverage and replay.
"""
import argparse
import base64
import collections
import concurrent.futures
import gzip
import hashlib
import hmac
import json
import os
import random
import re
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

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # grpc core logs every GOAWAY the fuzzer earns otherwise
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_BINARY = os.path.join(ROOT, ".build", "debug", "accelgate")
FINDINGS_DIR = os.path.join(HERE, "findings")
STUBS_DIR = os.path.join(HERE, ".stubs")

try:
    import zstandard
except ImportError:  # the zstd cases are then built from fixed frames only
    zstandard = None
try:
    import lz4.frame as lz4frame
except ImportError:
    lz4frame = None
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
U32, U64 = (1 << 32) - 1, (1 << 64) - 1
I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1

# Documented limits (README "Configuration", docs/STATUS.md, docs/KEYS.md) at their defaults.
MAX_REQUEST = 4 * MiB                       # --max-request-bytes
MAX_DECOMPRESSED = 4 * MiB                  # --max-decompressed-bytes
TRANSPORT_LIMIT = 4 * MAX_REQUEST + 64 * KiB  # ServiceConfiguration.transportMaxRequestBytes
MAX_AAD = 64 * KiB                          # CryptoService.maxAADBytes
TAG, NONCE = 16, 12
ENVELOPE_OVERHEAD = 6 + NONCE               # marker, version byte, key version, nonce


def compress_bound(n):
    return n + (n >> 8) + 1024              # accel_compress_bound


SEALED_LIMIT = compress_bound(MAX_REQUEST) + TAG + ENVELOPE_OVERHEAD  # largest Decrypt ciphertext
MAX_CONCURRENT_STREAMS = 256                # --max-concurrent-streams
DEFAULT_DEADLINE_MS = 3000                  # what the targets run with (--default-deadline-ms)
DEFAULT_DEADLINE_S = DEFAULT_DEADLINE_MS / 1000
HANG_SLACK_S = 5.0                          # a call must end within its deadline + this
CALL_S = 20.0                               # the client deadline of ordinary calls
HONEST_S = 10.0
# A local subchannel pool gives every channel its own TCP connection (grpc core otherwise
# shares one between channels of the same target and options, so a GOAWAY that a burst
# earns would also hit the honest client).
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB),
                   ("grpc.enable_retries", 0), ("grpc.use_local_subchannel_pool", 1)]

SVC = "/accelgate.v1.Accelerator/"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION = ["/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
              "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"]
UNARY_METHODS = ["Compress", "Decompress", "DescribeDevice", "Encrypt", "Decrypt", "Digest"]
STREAM_METHODS = ["Submit", "CompressStream", "DecompressStream"]
UNKNOWN_PATHS = [SVC + "Process", SVC + "compress", SVC, "/accelgate.v1.Accelerator", "/", "/a/b/c",
                 "/accelgate.v2.Accelerator/Compress", "/grpc.health.v1.Health/List", SVC + "Compress/x",
                 "/" + "x" * 2000, SVC + "Compress%00", "//accelgate.v1.Accelerator/Compress"]

# Fixed API keys (local test keys): a reproducer replays against a fresh target.
KEYS = {"alpha": "afz-alpha-3f9c2b7e41d05a86", "beta": "afz-beta-9e1d7a40c3b6f285",
        "honest": "afz-honest-5b82e06f1d9c4a37"}
AUTH = {
    "alpha": (("authorization", f"Bearer {KEYS['alpha']}"),),
    "beta": (("authorization", f"Bearer {KEYS['beta']}"),),
    "honest": (("authorization", f"Bearer {KEYS['honest']}"),),
    "none": (),
    "wrong": (("authorization", "Bearer afz-nobody-0000000000000000"),),
    "empty": (("authorization", "Bearer "),),
    "scheme": (("authorization", f"Basic {KEYS['alpha']}"),),
    "bare": (("authorization", KEYS["alpha"]),),
    "huge": (("authorization", "Bearer " + "k" * 7000),),
    "lower": (("authorization", f"bearer {KEYS['alpha']}"),),
    "space": (("authorization", f"Bearer  {KEYS['alpha']} "),),
    "two": (("authorization", "Bearer afz-nobody-0000000000000000"), ("authorization", f"Bearer {KEYS['alpha']}")),
    "other-header": (("x-api-key", KEYS["alpha"]),),
    "bin": (("authorization-bin", b"\x00\xffBearer\x00"),),
}
TENANT_OF = {"alpha": "alpha", "beta": "beta", "honest": "honest"}
# Answers to these must be UNAUTHENTICATED on Accelerator methods (never OK).
MUST_REFUSE = {"none", "wrong", "empty", "scheme", "bare", "huge", "other-header", "bin"}

FORMATS = {1: "deflate", 2: "zlib", 3: "gzip", 4: "zstd", 5: "lz4"}
LEVELS = {1: (0, 9), 2: (0, 9), 3: (0, 9), 4: (1, 19), 5: (0, 12)}
STREAM_FORMATS = (1, 2, 3, 4)
CIPHERS = {16: ("aes-128-gcm", 16), 17: ("aes-256-gcm", 32), 18: ("chacha20-poly1305", 32)}
DIGESTS = {32: "sha256", 33: "sha384", 34: "sha512", 35: "hmac-sha256", 36: "hmac-sha512", 37: "crc32c",
           38: "crc32", 39: "adler32"}
KEYED = {35: "hmac-sha256", 36: "hmac-sha512"}
BAD_FORMATS = [0, 6, 7, 8, 16, 32, 99, 255, 256, 257, I32_MAX, -1, -2, I32_MIN]
BAD_CIPHERS = [0, 1, 2, 3, 5, 15, 19, 20, 32, 35, 99, 255, 256 + 17, I32_MAX, -1, I32_MIN]
BAD_DIGESTS = [0, 1, 3, 16, 17, 31, 40, 41, 99, 255, 256 + 32, 256 + 38, 512 + 35, I32_MAX, -1, I32_MIN]


def key_material(name, version, n):
    return hashlib.shake_256(f"afz:{name}:{version}".encode()).digest(n)


# Named keys of the keyring the targets run with. versions: (version, disabled).
NAMED = {
    "a-aes128": {"tenant": "alpha", "alg": "aes-128-gcm", "len": 16, "versions": [(1, False), (2, False)]},
    "a-aes256": {"tenant": "alpha", "alg": "aes-256-gcm", "len": 32, "versions": [(1, True), (2, False), (3, False)],
                 "min": 2},
    "a-chacha": {"tenant": "alpha", "alg": "chacha20-poly1305", "len": 32, "versions": [(1, False)]},
    "a-hmac256": {"tenant": "alpha", "alg": "hmac-sha256", "len": 40, "versions": [(1, False)]},
    "a-hmac512": {"tenant": "alpha", "alg": "hmac-sha512", "len": 128, "versions": [(1, False)]},
    "b-aes256": {"tenant": "beta", "alg": "aes-256-gcm", "len": 32, "versions": [(1, False)]},
    "b-hmac256": {"tenant": "beta", "alg": "hmac-sha256", "len": 32, "versions": [(1, False)]},
}
ALG_NUMBER = {"aes-128-gcm": 16, "aes-256-gcm": 17, "chacha20-poly1305": 18, "hmac-sha256": 35, "hmac-sha512": 36}


def named_key(name, version):
    k = NAMED[name]
    return key_material(name, version, k["len"])


def newest_version(name):
    return max(v for v, disabled in NAMED[name]["versions"] if not disabled)


def usable_versions(name):
    k = NAMED[name]
    return [v for v, disabled in k["versions"] if not disabled and v >= k.get("min", 1)]


def keyring_yaml():
    lines = ["keys:"]
    for name, k in NAMED.items():
        lines += [f"  - name: {name}", f"    tenant: {k['tenant']}", f"    algorithm: {k['alg']}"]
        if "min" in k:
            lines.append(f"    min_decryption_version: {k['min']}")
        lines.append("    versions:")
        for v, disabled in k["versions"]:
            key = base64.b64encode(named_key(name, v)).decode()
            lines.append(f"      - {{ version: {v}, key: \"{key}\"{', disabled: true' if disabled else ''} }}")
    return "\n".join(lines) + "\n"


def tenants_yaml():
    lines = ["tenants:"]
    for tid, key in KEYS.items():
        lines += [f"  - id: {tid}", f"    api_key_sha256: [{hashlib.sha256(key.encode()).hexdigest()}]"]
    return "\n".join(lines) + "\n"


# ======================================================================================
# Stubs

pb = hpb = None


def load_stubs():
    """Generates the Python stubs (tests/interop/gen_stubs.py) into fuzz/api/.stubs."""
    global pb, hpb
    if pb is not None:
        return
    sys.path.insert(0, os.path.join(ROOT, "tests", "interop"))
    import gen_stubs
    gen_stubs.OUT = STUBS_DIR
    marker = os.path.join(STUBS_DIR, "accelgate", "v1", "accelerator_pb2.py")
    proto = os.path.join(ROOT, "proto", "accelgate", "v1", "accelerator.proto")
    if not os.path.exists(marker) or os.path.getmtime(marker) < os.path.getmtime(proto):
        gen_stubs.generate()
    if STUBS_DIR not in sys.path:
        sys.path.insert(0, STUBS_DIR)
    from accelgate.v1 import accelerator_pb2
    from agstubs_health import health_pb2
    pb, hpb = accelerator_pb2, health_pb2


def request_class(path):
    m = path[len(SVC):] if path.startswith(SVC) else None
    return {"Compress": pb.CompressRequest, "Decompress": pb.DecompressRequest, "Encrypt": pb.EncryptRequest,
            "Decrypt": pb.DecryptRequest, "Digest": pb.DigestRequest, "DescribeDevice": pb.DescribeDeviceRequest,
            "Submit": pb.SubmitRequest, "CompressStream": pb.CompressStreamRequest,
            "DecompressStream": pb.DecompressStreamRequest}.get(m) if m else (
        hpb.HealthCheckRequest if path in (HEALTH_CHECK, HEALTH_WATCH) else None)


def response_class(path):
    m = path[len(SVC):] if path.startswith(SVC) else None
    return {"Compress": pb.CompressResponse, "Decompress": pb.DecompressResponse, "Encrypt": pb.EncryptResponse,
            "Decrypt": pb.DecryptResponse, "Digest": pb.DigestResponse, "DescribeDevice": pb.DescribeDeviceResponse,
            "Submit": pb.SubmitResponse, "CompressStream": pb.CompressStreamResponse,
            "DecompressStream": pb.DecompressStreamResponse}.get(m) if m else (
        hpb.HealthCheckResponse if path in (HEALTH_CHECK, HEALTH_WATCH) else None)


def parse(cls, data):
    if cls is None or data is None:
        return None
    m = cls()
    try:
        m.ParseFromString(data)
    except Exception:
        return None
    return m


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode()


def b64d(text: str) -> bytes:
    return base64.b64decode(text)


def describe_msg(msg, limit=220):
    """A short one-line view of a message: bytes fields as their length and first bytes."""
    parts = []
    for fd, value in msg.ListFields():
        if fd.message_type is not None:
            parts.append(f"{fd.name}{{{describe_msg(value, 120)}}}")
        elif fd.type == fd.TYPE_BYTES:
            parts.append(f"{fd.name}=<{len(value)} B {value[:8].hex()}{'..' if len(value) > 8 else ''}>")
        elif fd.type == fd.TYPE_STRING:
            parts.append(f"{fd.name}={value[:40]!r}{'..' if len(value) > 40 else ''}")
        else:
            parts.append(f"{fd.name}={value}")
    s = " ".join(parts)
    return s if len(s) <= limit else s[:limit] + ".."


# ======================================================================================
# Reference codecs, ciphers and digests (independent of the server)

OVER = object()  # a reference decode that went past its cap
WBITS = {1: -15, 2: 15, 3: 31}


def py_compress(fmt, data, level=None):
    if fmt in WBITS:
        co = zlib.compressobj(6 if level is None or level < 0 else min(level, 9), zlib.DEFLATED, WBITS[fmt])
        return co.compress(data) + co.flush()
    if fmt == 4:
        return zstandard.ZstdCompressor(level=3 if level is None or level < 1 else min(level, 19),
                                        write_checksum=True).compress(data)
    if fmt == 5:
        return lz4frame.compress(data, compression_level=0 if level is None or level < 0 else min(level, 12),
                                 content_checksum=True)
    raise ValueError(fmt)


def _inflate_strict(fmt, data, cap):
    out = bytearray()
    rest = data
    if not rest:
        return None
    while True:
        d = zlib.decompressobj(WBITS[fmt])
        buf = rest
        try:
            while True:
                chunk = d.decompress(buf, cap + 1 - len(out))
                out += chunk
                if len(out) > cap:
                    return OVER
                buf = d.unconsumed_tail
                if d.eof or not buf:
                    break
            if not d.eof:
                out += d.flush()
                if len(out) > cap:
                    return OVER
        except zlib.error:
            return None
        if not d.eof:
            return None
        rest = d.unused_data
        if not rest:
            return bytes(out)
        if fmt != 3:
            return None  # trailing bytes after the stream


def _zstd_strict(data, cap):
    if zstandard is None or not data:
        return None
    dctx = zstandard.ZstdDecompressor()
    try:  # bound the output first (a bomb must not be decoded in full here)
        import io
        n = len(dctx.stream_reader(io.BytesIO(data), read_across_frames=True).read(cap + 1))
        if n > cap:
            return OVER
    except zstandard.ZstdError:
        return None
    out, rest = bytearray(), data
    while rest:
        o = dctx.decompressobj()
        try:
            out += o.decompress(rest)
        except zstandard.ZstdError:
            return None
        if not o.eof:
            return None
        rest = o.unused_data
    return bytes(out)


def _lz4_strict(data, cap):
    if lz4frame is None or not data:
        return None
    out, rest = bytearray(), data
    while rest:
        d = lz4frame.LZ4FrameDecompressor()
        try:
            out += d.decompress(rest, max_length=cap + 1 - len(out))
            while not d.eof and len(out) <= cap and not d.needs_input:
                chunk = d.decompress(b"", max_length=cap + 1 - len(out))
                if not chunk:
                    break
                out += chunk
        except RuntimeError:
            return None
        if len(out) > cap:
            return OVER
        if not d.eof:
            return None
        rest = d.unused_data or b""
    return bytes(out)


def py_decode(fmt, data, cap):
    """One complete stream of `fmt` (gzip members, zstd and lz4 frames may follow each
    other), nothing after it: the bytes, None if the reference refuses it, OVER past cap."""
    if fmt in WBITS:
        return _inflate_strict(fmt, data, cap)
    if fmt == 4:
        return _zstd_strict(data, cap)
    if fmt == 5:
        return _lz4_strict(data, cap)
    return None


_CRC32C_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC32C_TABLE.append(_c)


def crc32c(data):
    c = 0xFFFFFFFF
    t = _CRC32C_TABLE
    for b in data:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def ref_digest(alg, data, key):
    """The digest the server must return, or None when no reference is cheap enough."""
    if alg == 32:
        return hashlib.sha256(data).digest()
    if alg == 33:
        return hashlib.sha384(data).digest()
    if alg == 34:
        return hashlib.sha512(data).digest()
    if alg == 35:
        return hmac.new(key, data, hashlib.sha256).digest()
    if alg == 36:
        return hmac.new(key, data, hashlib.sha512).digest()
    if alg == 37:
        return struct.pack(">I", crc32c(data)) if len(data) <= 256 * KiB else None
    if alg == 38:
        return struct.pack(">I", zlib.crc32(data) & U32)
    if alg == 39:
        return struct.pack(">I", zlib.adler32(data) & U32)
    return None


def aead(alg, key):
    name = CIPHERS[alg][0]
    return ChaCha20Poly1305(key) if name == "chacha20-poly1305" else AESGCM(key)


def seal(alg, key, nonce, pt, aad):
    return aead(alg, key).encrypt(nonce, pt, aad or None)


def envelope_header(version):
    return b"\xA6\x01" + struct.pack(">I", version & U32)


def seal_envelope(name, version, pt, aad, nonce):
    alg = ALG_NUMBER[NAMED[name]["alg"]]
    header = envelope_header(version)
    return header + nonce + seal(alg, named_key(name, version), nonce, pt, header + aad)


def open_envelope(name, env, aad):
    """(version, plaintext) of a named-key envelope; raises on anything wrong."""
    if len(env) < ENVELOPE_OVERHEAD + TAG or env[0] != 0xA6 or env[1] != 0x01:
        raise ValueError("not an envelope")
    version = struct.unpack(">I", env[2:6])[0]
    if not any(v == version for v, _ in NAMED[name]["versions"]):
        raise ValueError(f"unknown version {version}")
    alg = ALG_NUMBER[NAMED[name]["alg"]]
    return version, aead(alg, named_key(name, version)).decrypt(env[6:18], env[18:], env[:6] + aad)


# ======================================================================================
# Payloads and bombs

_WORDS = ("the of and to in is was for that with as on by at from this be are or it an which accelerator queue "
          "engine descriptor doorbell completion compress decompress payload stream header trailer checksum "
          "deadline tenant buffer memory device driver request response service limit window huffman literal "
          "distance length block stored dynamic fixed server client network latency throughput batch ring").split()


def _corpus():
    rng = random.Random(20261207)
    out = bytearray()
    while len(out) < MAX_REQUEST + 64 * KiB:
        out += (" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 15))).capitalize()
                + rng.choice([". ", "? ", ".\n", "! "])).encode()
    return bytes(out)


TEXT = _corpus()
_BOMBS = None
_BOMB_LOCK = threading.Lock()


def bombs():
    """Decompression bombs per format: (label, data, decompressed size)."""
    global _BOMBS
    with _BOMB_LOCK:
        if _BOMBS is not None:
            return _BOMBS
        z8 = bytes(8 * MiB)
        co = zlib.compressobj(9, zlib.DEFLATED, -15)
        co.compress(z8)
        co.flush(zlib.Z_FULL_FLUSH)
        block = co.compress(z8) + co.flush(zlib.Z_FULL_FLUSH)  # after a full flush every 8 MiB block is the same
        raw = block * 128 + b"\x03\x00"                       # 1 GiB of zeros, then an empty final block
        crc_gib = 0x5B64C2B0                                  # CRC-32 of 2^30 zero bytes
        adler_gib = ((GiB % 65521) << 16) | 1
        out = {1: [("1GiB-zeros", raw, GiB)],
               2: [("1GiB-zeros", b"\x78\xda" + raw + struct.pack(">I", adler_gib), GiB)],
               3: [("1GiB-zeros", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + raw +
                    struct.pack("<II", crc_gib, GiB & U32), GiB),
                   ("1GiB-zeros-lying-isize", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + raw +
                    struct.pack("<II", crc_gib, 10), GiB)],
               4: [], 5: []}
        out[1].append(("8MiB-zeros-x2-blocks", block * 2 + b"\x03\x00", 16 * MiB))
        if zstandard is not None:
            f64 = zstandard.ZstdCompressor(level=3).compress(bytes(64 * MiB))
            out[4] += [("1GiB-zeros-16-frames", f64 * 16, GiB), ("64MiB-zeros", f64, 64 * MiB)]
        if lz4frame is not None:
            l64 = lz4frame.compress(bytes(64 * MiB), compression_level=0)
            out[5] += [("256MiB-zeros-4-frames", l64 * 4, 256 * MiB), ("64MiB-zeros", l64, 64 * MiB)]
        _BOMBS = out
        return out


SIZE_EDGES = [(0, 14), (1, 8), (2, 2), (3, 2), (7, 1), (15, 3), (16, 4), (17, 3), (31, 1), (32, 1), (33, 1),
              (63, 1), (64, 1), (100, 4), (255, 1), (256, 1), (1000, 4), (4095, 1), (4096, 2), (4097, 1),
              (32 * KiB, 2), (65535, 1), (65536, 2), (65537, 1), (200 * KiB, 2), (MiB, 1)]


def pick(rng, weighted):
    total = sum(w for _, w in weighted)
    r = rng.uniform(0, total)
    for v, w in weighted:
        r -= w
        if r <= 0:
            return v
    return weighted[-1][0]


def pick_size(rng, big=0.02):
    if rng.random() < big:
        return rng.choice([MAX_REQUEST - 1, MAX_REQUEST, MAX_REQUEST + 1, 2 * MiB, 3 * MiB])
    if rng.random() < 0.25:
        return rng.randint(0, 5000)
    return pick(rng, SIZE_EDGES)


def payload(rng, n):
    kind = rng.choice(["text", "text", "zeros", "random", "pattern", "mixed"])
    if kind == "text":
        at = rng.randint(0, len(TEXT) - n) if n < len(TEXT) else 0
        return TEXT[at:at + n] if n <= len(TEXT) else (TEXT * (n // len(TEXT) + 1))[:n]
    if kind == "zeros":
        return bytes(n)
    if kind == "random":
        return rng.randbytes(n)
    if kind == "pattern":
        unit = rng.randbytes(rng.randint(1, 7))
        return (unit * (n // len(unit) + 1))[:n]
    half = n // 2
    return rng.randbytes(half) + TEXT[:n - half]


def flip(rng, data, count=1):
    if not data:
        return data
    b = bytearray(data)
    for _ in range(count):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8) if rng.random() < 0.6 else rng.randint(1, 255)
    return bytes(b)


def varint(v):
    v &= U64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(num, data):
    return varint((num << 3) | 2) + varint(len(data)) + data


def field_varint(num, value):
    return varint(num << 3) + varint(value)


# RFC 7541 Appendix B: Huffman codes of symbols 0..256 (EOS), and their lengths in bits.
_HUFF_CODES = [
    0x1ff8, 0x7fffd8, 0xfffffe2, 0xfffffe3, 0xfffffe4, 0xfffffe5, 0xfffffe6, 0xfffffe7, 0xfffffe8, 0xffffea,
    0x3ffffffc, 0xfffffe9, 0xfffffea, 0x3ffffffd, 0xfffffeb, 0xfffffec, 0xfffffed, 0xfffffee, 0xfffffef, 0xffffff0,
    0xffffff1, 0xffffff2, 0x3ffffffe, 0xffffff3, 0xffffff4, 0xffffff5, 0xffffff6, 0xffffff7, 0xffffff8, 0xffffff9,
    0xffffffa, 0xffffffb, 0x14, 0x3f8, 0x3f9, 0xffa, 0x1ff9, 0x15, 0xf8, 0x7fa, 0x3fa, 0x3fb, 0xf9, 0x7fb, 0xfa,
    0x16, 0x17, 0x18, 0x0, 0x1, 0x2, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, 0x5c, 0xfb, 0x7ffc, 0x20, 0xffb,
    0x3fc, 0x1ffa, 0x21, 0x5d, 0x5e, 0x5f, 0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b,
    0x6c, 0x6d, 0x6e, 0x6f, 0x70, 0x71, 0x72, 0xfc, 0x73, 0xfd, 0x1ffb, 0x7fff0, 0x1ffc, 0x3ffc, 0x22, 0x7ffd, 0x3,
    0x23, 0x4, 0x24, 0x5, 0x25, 0x26, 0x27, 0x6, 0x74, 0x75, 0x28, 0x29, 0x2a, 0x7, 0x2b, 0x76, 0x2c, 0x8, 0x9,
    0x2d, 0x77, 0x78, 0x79, 0x7a, 0x7b, 0x7ffe, 0x7fc, 0x3ffd, 0x1ffd, 0xffffffc, 0xfffe6, 0x3fffd2, 0xfffe7,
    0xfffe8, 0x3fffd3, 0x3fffd4, 0x3fffd5, 0x7fffd9, 0x3fffd6, 0x7fffda, 0x7fffdb, 0x7fffdc, 0x7fffdd, 0x7fffde,
    0xffffeb, 0x7fffdf, 0xffffec, 0xffffed, 0x3fffd7, 0x7fffe0, 0xffffee, 0x7fffe1, 0x7fffe2, 0x7fffe3, 0x7fffe4,
    0x1fffdc, 0x3fffd8, 0x7fffe5, 0x3fffd9, 0x7fffe6, 0x7fffe7, 0xffffef, 0x3fffda, 0x1fffdd, 0xfffe9, 0x3fffdb,
    0x3fffdc, 0x7fffe8, 0x7fffe9, 0x1fffde, 0x7fffea, 0x3fffdd, 0x3fffde, 0xfffff0, 0x1fffdf, 0x3fffdf, 0x7fffeb,
    0x7fffec, 0x1fffe0, 0x1fffe1, 0x3fffe0, 0x1fffe2, 0x7fffed, 0x3fffe1, 0x7fffee, 0x7fffef, 0xfffea, 0x3fffe2,
    0x3fffe3, 0x3fffe4, 0x7ffff0, 0x3fffe5, 0x3fffe6, 0x7ffff1, 0x3ffffe0, 0x3ffffe1, 0xfffeb, 0x7fff1, 0x3fffe7,
    0x7ffff2, 0x3fffe8, 0x1ffffec, 0x3ffffe2, 0x3ffffe3, 0x3ffffe4, 0x7ffffde, 0x7ffffdf, 0x3ffffe5, 0xfffff1,
    0x1ffffed, 0x7fff2, 0x1fffe3, 0x3ffffe6, 0x7ffffe0, 0x7ffffe1, 0x3ffffe7, 0x7ffffe2, 0xfffff2, 0x1fffe4,
    0x1fffe5, 0x3ffffe8, 0x3ffffe9, 0xffffffd, 0x7ffffe3, 0x7ffffe4, 0x7ffffe5, 0xfffec, 0xfffff3, 0xfffed,
    0x1fffe6, 0x3fffe9, 0x1fffe7, 0x1fffe8, 0x7ffff3, 0x3fffea, 0x3fffeb, 0x1ffffee, 0x1ffffef, 0xfffff4, 0xfffff5,
    0x3ffffea, 0x7ffff4, 0x3ffffeb, 0x7ffffe6, 0x3ffffec, 0x3ffffed, 0x7ffffe7, 0x7ffffe8, 0x7ffffe9, 0x7ffffea,
    0x7ffffeb, 0xffffffe, 0x7ffffec, 0x7ffffed, 0x7ffffee, 0x7ffffef, 0x7fffff0, 0x3ffffee, 0x3fffffff]
_HUFF_LENGTHS = bytes.fromhex(
    "0d171c1c1c1c1c1c1c181e1c1c1e1c1c1c1c1c1c1c1c1e1c1c1c1c1c1c1c1c1c060a0a0c0d06080b0a0a080b080606060505"
    "050606060606060607080f060c0a0d06070707070707070707070707070707070707070707070807080d130d0e060f050605"
    "06050606060507070606060506070605050607070707070f0b0e0d1c14161414161616171617171717171817181816171817"
    "1717171516171617171816151416161717151716161815161717151516151716171714161616171616171a1a141316171619"
    "1a1a1a1b1b1a181913151a1b1b1a1b1815151a1a1c1b1b1b14181415161515171616191918181a171a1b1a1a1b1b1b1b1b1c"
    "1b1b1b1b1b1a1e")
# RFC 7541 Appendix A: the static table (index 1..61).
_HPACK_STATIC = [
    (':authority', ''), (':method', 'GET'), (':method', 'POST'), (':path', '/'), (':path', '/index.html'),
    (':scheme', 'http'), (':scheme', 'https'), (':status', '200'), (':status', '204'), (':status', '206'),
    (':status', '304'), (':status', '400'), (':status', '404'), (':status', '500'), ('accept-charset', ''),
    ('accept-encoding', 'gzip, deflate'), ('accept-language', ''), ('accept-ranges', ''), ('accept', ''),
    ('access-control-allow-origin', ''), ('age', ''), ('allow', ''), ('authorization', ''), ('cache-control', ''),
    ('content-disposition', ''), ('content-encoding', ''), ('content-language', ''), ('content-length', ''),
    ('content-location', ''), ('content-range', ''), ('content-type', ''), ('cookie', ''), ('date', ''),
    ('etag', ''), ('expect', ''), ('expires', ''), ('from', ''), ('host', ''), ('if-match', ''),
    ('if-modified-since', ''), ('if-none-match', ''), ('if-range', ''), ('if-unmodified-since', ''),
    ('last-modified', ''), ('link', ''), ('location', ''), ('max-forwards', ''), ('proxy-authenticate', ''),
    ('proxy-authorization', ''), ('range', ''), ('referer', ''), ('refresh', ''), ('retry-after', ''),
    ('server', ''), ('set-cookie', ''), ('strict-transport-security', ''), ('transfer-encoding', ''),
    ('user-agent', ''), ('vary', ''), ('via', ''), ('www-authenticate', ''),
]


_HUFF_DECODE = {(_HUFF_LENGTHS[sym], code): sym for sym, code in enumerate(_HUFF_CODES)}


def huffman_decode(data):
    out, code, n = bytearray(), 0, 0
    for byte in data:
        for bit in range(7, -1, -1):
            code = (code << 1) | ((byte >> bit) & 1)
            n += 1
            sym = _HUFF_DECODE.get((n, code))
            if sym is not None:
                if sym == 256:
                    raise ValueError("EOS in a Huffman string")
                out.append(sym)
                code, n = 0, 0
            elif n > 30:
                raise ValueError("bad Huffman code")
    if n > 7 or code != (1 << n) - 1:
        raise ValueError("bad Huffman padding")
    return bytes(out)



# What gRPC's C core (chttp2, 1.51) answers a stream whose request headers are malformed.
CORE_HEADER_REFUSAL = re.compile(r"^(Missing :?[a-z-]+ header|Bad [a-z-]+ header)$")



class HPACKDecoder:
    """Just enough HPACK (RFC 7541) to read a server's response headers and trailers."""

    def __init__(self):
        self.dynamic, self.size, self.max = [], 0, 4096

    @staticmethod
    def _int(data, i, prefix):
        mask = (1 << prefix) - 1
        v = data[i] & mask
        i += 1
        if v < mask:
            return v, i
        shift = 0
        while True:
            b = data[i]
            i += 1
            v += (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return v, i

    def _str(self, data, i):
        huff = data[i] & 0x80
        n, i = self._int(data, i, 7)
        raw = data[i:i + n]
        if len(raw) != n:
            raise ValueError("string past the end of the block")
        return (huffman_decode(raw) if huff else raw).decode("latin-1"), i + n

    def _get(self, idx):
        if 1 <= idx <= len(_HPACK_STATIC):
            return _HPACK_STATIC[idx - 1]
        return self.dynamic[idx - len(_HPACK_STATIC) - 1]

    def _evict(self):
        while self.size > self.max and self.dynamic:
            n, v = self.dynamic.pop()
            self.size -= len(n) + len(v) + 32

    def decode(self, data):
        out, i = [], 0
        while i < len(data):
            b = data[i]
            if b & 0x80:
                idx, i = self._int(data, i, 7)
                out.append(self._get(idx))
                continue
            if b & 0xE0 == 0x20:
                self.max, i = self._int(data, i, 5)
                self._evict()
                continue
            incremental = bool(b & 0x40)
            idx, i = self._int(data, i, 6 if incremental else 4)
            if idx:
                name = self._get(idx)[0]
            else:
                name, i = self._str(data, i)
            value, i = self._str(data, i)
            if incremental:
                self.dynamic.insert(0, (name, value))
                self.size += len(name) + len(value) + 32
                self._evict()
            out.append((name, value))
        return out


def parse_h2_responses(buf):
    """The server's side of a raw HTTP/2 connection: per stream its header blocks
    (decoded), gRPC messages, RST_STREAM code; and GOAWAY codes."""
    dec = HPACKDecoder()
    streams = collections.defaultdict(lambda: {"blocks": [], "data": b"", "rst": None})
    goaways, pending, i = [], None, 0
    while len(buf) - i >= 9:
        ln = int.from_bytes(buf[i:i + 3], "big")
        if len(buf) - i < 9 + ln:
            break
        ftype, flags = buf[i + 3], buf[i + 4]
        sid = int.from_bytes(buf[i + 5:i + 9], "big") & 0x7FFFFFFF
        pl = buf[i + 9:i + 9 + ln]
        i += 9 + ln
        if ftype == 0:
            if flags & 0x8 and pl:
                pl = pl[1:len(pl) - pl[0]]
            streams[sid]["data"] += pl
        elif ftype in (1, 9):
            if ftype == 1:
                if flags & 0x8 and pl:
                    pl = pl[1:len(pl) - pl[0]]
                if flags & 0x20:
                    pl = pl[5:]
                pending = (sid, bytearray(pl))
            elif pending is not None:
                pending[1].extend(pl)
            if flags & 0x4 and pending is not None:
                streams[pending[0]]["blocks"].append(dict(dec.decode(bytes(pending[1]))))
                pending = None
        elif ftype == 3 and len(pl) >= 4:
            streams[sid]["rst"] = int.from_bytes(pl[:4], "big")
        elif ftype == 7 and len(pl) >= 8:
            goaways.append(int.from_bytes(pl[4:8], "big"))
    for st in streams.values():
        msgs, d = 0, st["data"]
        while len(d) >= 5:
            n = int.from_bytes(d[1:5], "big")
            if len(d) < 5 + n:
                break
            msgs += 1
            d = d[5 + n:]
        st["messages"] = msgs
    return streams, goaways


def _h2_unquote(text):
    from urllib.parse import unquote
    return unquote(text or "")


# ======================================================================================
# Steps (what generators emit; what reproducers contain)

def unary(method, req, auth="alpha", timeout=CALL_S, valid=False, cancel_after=None, fresh=False):
    path = method if method.startswith("/") else SVC + method
    data = req if isinstance(req, (bytes, bytearray)) else req.SerializeToString()
    step = {"op": "unary", "path": path, "req": b64e(bytes(data)), "auth": auth, "timeout": timeout,
            "valid": bool(valid)}
    if not isinstance(req, (bytes, bytearray)):
        step["desc"] = describe_msg(req)
    if cancel_after is not None:
        step["cancel_after"] = cancel_after
    if fresh:
        step["fresh"] = True
    return step


def stream(method, msgs, auth="alpha", timeout=CALL_S, mode="close", cut=None, cancel_after=None, valid=None,
           read_delay=0.0, shape="bidi", fresh=False):
    """mode: close (send all, half-close), hold (send msgs[:cut], then neither send nor
    close until the deadline), cancel (send msgs[:cut], cancel after cancel_after s)."""
    path = method if method.startswith("/") else SVC + method
    enc = [bytes(m) if isinstance(m, (bytes, bytearray)) else m.SerializeToString() for m in msgs]
    step = {"op": "stream", "shape": shape, "path": path, "msgs": [b64e(m) for m in enc], "auth": auth,
            "timeout": timeout, "mode": mode, "valid": valid if valid is not None else False}
    if cut is not None:
        step["cut"] = cut
    if cancel_after is not None:
        step["cancel_after"] = cancel_after
    if read_delay:
        step["read_delay"] = read_delay
    if fresh:
        step["fresh"] = True
    descs = [describe_msg(m, 100) for m in msgs[:6] if not isinstance(m, (bytes, bytearray))]
    if descs:
        step["desc"] = " | ".join(descs) + (f" | ... ({len(msgs)} messages)" if len(msgs) > 6 else "")
    return step


def chain(calls, links, roundtrip=None):
    """Unary calls in order; links[i] = [[src call, response field, request field], ...]
    fill call i's request from earlier responses. roundtrip = [[call, request field],
    [call, response field]] that must be equal when every call succeeded."""
    return {"op": "chain", "calls": calls, "links": links, "roundtrip": roundtrip}


def parallel(steps):
    return {"op": "parallel", "steps": steps}


def h2raw(data, read_s=0.3, desc="", expect=None):
    """Raw bytes on a plain TCP connection; `expect` = {stream id: {"path", "jobs"}}
    for streams whose answers are checked (statuses; a Submit's job count)."""
    step = {"op": "h2raw", "bytes": b64e(data), "read_s": read_s, "desc": desc}
    if expect:
        step["expect"] = {str(k): v for k, v in expect.items()}
    return step


class Case:
    def __init__(self, name, steps, tag=""):
        self.name, self.steps, self.tag = name, steps, tag

    def to_lines(self, index):
        yield {"case": index, "name": self.name, "tag": self.tag}
        for s in self.steps:
            yield {"case": index, "step": s}


def units_of(steps):
    """The steps a crash is reduced to: parallel steps opened up, chains kept whole
    (their calls depend on the answers before them)."""
    for s in steps:
        if s["op"] == "parallel":
            yield from units_of(s["steps"])
        else:
            yield s


# ======================================================================================
# Running steps

class Issue:
    def __init__(self, kind, detail):
        self.kind, self.detail = kind, detail


# INTERNAL answers the API documents on purpose (docs/STATUS.md): none for input a client
# can send; an empty list makes every INTERNAL a finding.
INTERNAL_ALLOWED = []
# The transport's answer to a client that breaks a method's cardinality (no request, or
# several, on a unary or server-streaming method): INTERNAL, as in grpc-java ("Half-closed
# without a request", "Too many requests"). Allowed only on such a call.
CARDINALITY_MESSAGES = ("Empty stream.", "Too many messages.")
SINGLE_REQUEST_PATHS = {SVC + m for m in UNARY_METHODS} | {HEALTH_CHECK, HEALTH_WATCH}


class Runner:
    """Runs the steps of a case against one target and applies the per-call oracles."""

    def __init__(self, target, stats):
        import grpc
        self.grpc = grpc
        self.target, self.stats = target, stats
        self.lock = threading.Lock()
        self.sent = collections.deque(maxlen=16)  # (step, request bytes) of the last unary calls, as sent

    def count(self, key, n=1):
        with self.lock:
            self.stats[key] += n

    def account(self, path, code, details=""):
        with self.lock:
            self.stats["calls"] += 1
            self.stats["status:" + code] += 1
            if code in ("UNAVAILABLE", "INTERNAL", "UNKNOWN"):
                self.stats[f"msg:{code}:{re.sub(r'[0-9]+', 'N', details)[:70]}"] += 1
            short = path[len(SVC):] if path.startswith(SVC) else path.rsplit("/", 1)[-1] or path
            self.stats[f"method:{short[:24]}:{code}"] += 1

    def run(self, case):
        issues = []
        channel = self.target.channel()
        for step in case.steps:
            self.exec(step, channel, issues)
            if not self.target.alive():
                break
        return issues

    def exec(self, step, channel, issues):
        op = step["op"]
        try:
            if op == "unary":
                return self.unary(step, channel, issues)
            if op == "stream":
                return self.stream(step, channel, issues)
            if op == "chain":
                return self.chain(step, channel, issues)
            if op == "parallel":
                return self.parallel(step, channel, issues)
            if op == "h2raw":
                return self.h2raw(step, issues)
        except Exception as e:  # a fuzzer bug must not look like a server finding
            self.count("runner_errors")
            if not getattr(self, "_warned", False):
                self._warned = True
                import traceback
                traceback.print_exc()
            return None
        raise ValueError(f"unknown step {op}")

    def _channel(self, step, channel):
        if step.get("fresh"):
            return self.grpc.insecure_channel(f"127.0.0.1:{self.target.port}", options=CHANNEL_OPTIONS), True
        return channel, False

    # -- unary -----------------------------------------------------------------------

    def unary(self, step, channel, issues, req=None):
        grpc = self.grpc
        path = step["path"]
        req = b64d(step["req"]) if req is None else req
        md = AUTH[step["auth"]]
        timeout = step.get("timeout")
        ch, own = self._channel(step, channel)
        mc = ch.unary_unary(path)
        with self.lock:
            self.sent.append((step, req))
        budget = (timeout if timeout is not None else DEFAULT_DEADLINE_S) + HANG_SLACK_S
        t0 = time.monotonic()
        code, details, trailing, resp = "OK", "", {}, None
        try:
            fut = mc.future(req, timeout=timeout, metadata=md)
            if step.get("cancel_after") is not None:
                try:
                    fut.result(timeout=step["cancel_after"])
                except Exception:
                    pass
                fut.cancel()
            try:
                resp = fut.result(timeout=budget)
                trailing = dict(fut.trailing_metadata() or ())
            except grpc.FutureTimeoutError:
                code = "HANG"
                fut.cancel()
            except grpc.FutureCancelledError:
                code, details = "CANCELLED", "(cancelled by the fuzzer)"
            except grpc.RpcError as e:
                code, details = e.code().name, e.details() or ""
                trailing = dict(e.trailing_metadata() or ())
        finally:
            if own:
                ch.close()
        elapsed = time.monotonic() - t0
        self.account(path, code, details)
        self.check_status(step, path, code, details, trailing, elapsed, issues)
        if code == "OK":
            self.check_output(step, path, req, resp, issues)
        elif code == "UNAVAILABLE":
            self.target.settle_death()
        return code, resp, req

    # -- streams ---------------------------------------------------------------------

    def stream(self, step, channel, issues):
        grpc = self.grpc
        path = step["path"]
        msgs = [b64d(m) for m in step["msgs"]]
        md = AUTH[step["auth"]]
        timeout = step.get("timeout") or CALL_S
        mode = step.get("mode", "close")
        cut = step.get("cut", len(msgs))
        ch, own = self._channel(step, channel)
        gate = threading.Event()
        sent = [0]

        def requests():
            for i, m in enumerate(msgs):
                if mode in ("hold", "cancel") and i >= cut:
                    break
                sent[0] += 1
                yield m
            if mode in ("hold", "cancel"):
                gate.wait(timeout + HANG_SLACK_S)

        responses, result = [], {"code": None, "details": "", "trailing": {}}
        t0 = time.monotonic()
        try:
            if step.get("shape") == "ustream":
                call = ch.unary_stream(path)(msgs[0] if msgs else b"", timeout=timeout, metadata=md)
            else:
                call = ch.stream_stream(path)(requests(), timeout=timeout, metadata=md)

            def reader():
                try:
                    if step.get("read_delay"):
                        time.sleep(step["read_delay"])
                    for r in call:
                        responses.append(r)
                    result["code"] = "OK"
                    result["trailing"] = dict(call.trailing_metadata() or ())
                except grpc.RpcError as e:
                    result["code"], result["details"] = e.code().name, e.details() or ""
                    try:
                        result["trailing"] = dict(e.trailing_metadata() or ())
                    except Exception:
                        pass
                except Exception as e:  # the iterator itself failed
                    result["code"], result["details"] = "CLIENT_ERROR", f"{type(e).__name__}: {e}"

            th = threading.Thread(target=reader, daemon=True)
            th.start()
            if mode == "cancel":
                th.join(step.get("cancel_after", 0.0))
                call.cancel()
            th.join(timeout + HANG_SLACK_S + (step.get("read_delay") or 0))
            if th.is_alive():
                result["code"] = "HANG"
                call.cancel()
                th.join(2)
        finally:
            gate.set()
            if own:
                ch.close()
        code = result["code"] or "HANG"
        if code == "CANCELLED" and mode == "cancel" and result["details"].startswith("Locally cancelled"):
            result["details"] = "(cancelled by the fuzzer)"
        elapsed = time.monotonic() - t0
        self.account(path, code, result["details"])
        self.check_status(step, path, code, result["details"], result["trailing"], elapsed, issues)
        self.check_stream(step, path, msgs, sent[0], code, responses, issues)
        if code == "UNAVAILABLE":
            self.target.settle_death()
        return code, responses, msgs

    # -- chains, parallel steps, raw HTTP/2 --------------------------------------------

    def chain(self, step, channel, issues):
        done = []  # (request message, response message) per call
        for i, call in enumerate(step["calls"]):
            req = b64d(call["req"])
            links = step["links"][i] if i < len(step["links"]) else []
            if links:
                msg = parse(request_class(call["path"]), req)
                for src, rfield, qfield in links:
                    setattr(msg, qfield, getattr(done[src][1], rfield))
                req = msg.SerializeToString()
            code, resp, req = self.unary(call, channel, issues, req=req)
            if code != "OK":
                self.count("chains_broken")
                return
            done.append((parse(request_class(call["path"]), req), parse(response_class(call["path"]), resp)))
        self.count("chains_complete")
        rt = step.get("roundtrip")
        if rt:
            (qi, qf), (ri, rf) = rt
            want, got = getattr(done[qi][0], qf), getattr(done[ri][1], rf)
            if want != got:
                issues.append(Issue("wrong-output", f"chain round trip: {len(want)} bytes in, {len(got)} bytes out, "
                                                    f"differ ({want[:16].hex()} vs {got[:16].hex()})"))
            else:
                self.count("checked")

    def parallel(self, step, channel, issues):
        """Sub-steps at once, on a connection of their own (a GOAWAY the burst may earn
        must not fail the next cases)."""
        subs = step["steps"]
        local = [[] for _ in subs]
        channel = self.grpc.insecure_channel(f"127.0.0.1:{self.target.port}", options=CHANNEL_OPTIONS)
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(subs), 300)) as ex:
            futs = [ex.submit(self.exec, s, channel, local[i]) for i, s in enumerate(subs)]
            for f in futs:
                f.result()
        channel.close()
        for lst in local:
            issues.extend(lst)

    def h2raw(self, step, issues):
        data = b64d(step["bytes"])
        self.count("h2_connections")
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2.0)
        try:
            s.connect(("127.0.0.1", self.target.port))
            try:
                s.sendall(data)
            except OSError:
                self.count("h2_send_refused")
            expect = step.get("expect") or {}
            end = time.monotonic() + step.get("read_s", 0.3) + (1.5 if expect else 0)
            buf, acked = bytearray(), False
            while time.monotonic() < end:
                s.settimeout(max(0.01, end - time.monotonic()))
                try:
                    chunk = s.recv(65536)
                except (socket.timeout, OSError):
                    break
                if not chunk:
                    self.count("h2_closed_by_server")
                    break
                buf += chunk
                if not acked and len(buf) >= 9 and buf[3] == 4:
                    acked = True
                    try:
                        s.sendall(h2_frame(4, 1, 0, b""))  # ACK the server's SETTINGS
                    except OSError:
                        pass
                if expect and self._h2_done(buf, expect):
                    break
            self.count("h2_bytes_back", len(buf))
            self.check_h2(step, bytes(buf), issues)
        except OSError:
            self.count("h2_connect_failed")
        finally:
            s.close()

    @staticmethod
    def _h2_done(buf, expect):
        try:
            streams, goaways = parse_h2_responses(bytes(buf))
        except Exception:
            return False
        if goaways:
            return True
        return all(any("grpc-status" in b for b in streams[int(k)]["blocks"]) or streams[int(k)]["rst"] is not None
                   for k in expect if int(k) in streams) and all(int(k) in streams for k in expect)

    def check_h2(self, step, buf, issues):
        """The status oracle on every stream the server answered on a raw connection, and
        for expected Submit streams: an OK status carries one answer per job."""
        try:
            streams, goaways = parse_h2_responses(buf)
        except Exception:
            self.count("h2_undecodable")
            return
        expect = step.get("expect") or {}
        what = f"raw HTTP/2 ({step.get('desc', '')[:80]})"
        for sid, st in sorted(streams.items()):
            if sid == 0:
                continue
            trailers = [b for b in st["blocks"] if "grpc-status" in b]
            if not trailers:
                continue
            t = trailers[-1]
            try:
                code = _code_name(int(t["grpc-status"]))
            except ValueError:
                issues.append(Issue("bad-response", f"{what}: stream {sid}: grpc-status {t['grpc-status']!r}"))
                continue
            details = _h2_unquote(t.get("grpc-message"))
            exp = expect.get(str(sid), {})
            path = exp.get("path", "?")
            self.account("h2:" + path, code, details)
            if code == "UNKNOWN" and CORE_HEADER_REFUSAL.match(details or ""):
                # gRPC's C core refuses a stream with malformed request headers itself, before any handler,
                # with UNKNOWN and a message naming the header (docs/EDGE.md): counted, not a finding.
                self.count("core_header_refusals")
            elif code == "UNKNOWN":
                issues.append(Issue("unknown-status", f"{what}: stream {sid} {path}: UNKNOWN {details!r}"))
            elif code == "INTERNAL" and details not in CARDINALITY_MESSAGES and \
                    not any(re.search(p, details) for p in INTERNAL_ALLOWED):
                issues.append(Issue("internal-status", f"{what}: stream {sid} {path}: INTERNAL {details!r}"))
            jobs = exp.get("jobs", 0)
            if path.endswith("/Submit") and jobs and code == "OK" and st["messages"] != jobs:
                issues.append(Issue("submit-mismatch", f"{what}: stream {sid}: Submit of {jobs} jobs "
                                                       f"({exp.get('note', '')}) ended OK with {st['messages']} "
                                                       f"responses"))

    # -- oracles -----------------------------------------------------------------------

    def check_status(self, step, path, code, details, trailing, elapsed, issues):
        what = f"{path.rsplit('/', 1)[-1] or path} [{step.get('desc', '')[:160]}]"
        if code == "HANG":
            to = step.get("timeout")
            issues.append(Issue("hang", f"{what}: no status {HANG_SLACK_S:.0f} s after the "
                                        f"{'client deadline ' + str(to) + ' s' if to else 'server default deadline'}"))
            return
        if code == "UNKNOWN":
            issues.append(Issue("unknown-status", f"{what}: UNKNOWN {details!r}"))
        elif code == "INTERNAL" and step["op"] == "stream" and path in SINGLE_REQUEST_PATHS and \
                details in CARDINALITY_MESSAGES:
            self.count("cardinality_refusals")
        elif code == "INTERNAL" and not any(re.search(p, details) for p in INTERNAL_ALLOWED):
            issues.append(Issue("internal-status", f"{what}: INTERNAL {details!r}"))
        elif code == "CLIENT_ERROR":
            self.count("client_errors")
        if path.startswith(SVC) and step.get("auth") in MUST_REFUSE and code == "OK":
            issues.append(Issue("auth-bypass", f"{what}: OK with API key variant {step['auth']!r}"))
        if step.get("valid") is True and code != "OK":
            admission = code == "RESOURCE_EXHAUSTED" and "retry-after-ms" in trailing
            # A burst of cancelled streams may earn its connection a GOAWAY (HTTP/2 reset-flood guard).
            goaway = step.get("burst") and code == "UNAVAILABLE"
            # A slow (loaded) server may use up the whole deadline: that is the deadline working.
            deadline = step.get("timeout") or DEFAULT_DEADLINE_S
            late = code == "DEADLINE_EXCEEDED" and elapsed >= 0.9 * deadline
            if admission:
                self.count("valid_rejected_admission")
            elif goaway:
                self.count("valid_lost_to_goaway")
            elif late:
                self.count("valid_deadline_used_up")
            else:
                issues.append(Issue("valid-refused", f"{what}: a valid request got {code} {details!r} "
                                                     f"after {elapsed:.2f} s"))

    def check_output(self, step, path, req_bytes, resp_bytes, issues):
        if not path.startswith(SVC) and path != HEALTH_CHECK:
            return
        req = parse(request_class(path), req_bytes)
        resp = parse(response_class(path), resp_bytes)
        if req is None or resp is None:
            if response_class(path) is not None:
                issues.append(Issue("bad-response", f"{path}: OK but the response does not parse "
                                                    f"({len(resp_bytes or b'')} bytes)"))
            return
        problem = check_job(path.rsplit("/", 1)[-1], req, resp, TENANT_OF.get(step.get("auth")))
        if problem and problem[0] == "lenient":
            self.count("lenient_accepts")
        elif problem:
            issues.append(Issue(problem[0], f"{path.rsplit('/', 1)[-1]} [{step.get('desc', '')[:160]}]: "
                                            f"{problem[1]}"))
        else:
            self.count("checked")

    def check_stream(self, step, path, msgs, sent, code, responses, issues):
        m = path[len(SVC):] if path.startswith(SVC) else None
        what = f"{m} [{step.get('desc', '')[:160]}]"
        if m == "Submit":
            self.check_submit(step, msgs, sent, code, responses, issues)
            return
        if code != "OK" or m not in ("CompressStream", "DecompressStream"):
            return
        cls = pb.CompressStreamRequest if m == "CompressStream" else pb.DecompressStreamRequest
        rcls = pb.CompressStreamResponse if m == "CompressStream" else pb.DecompressStreamResponse
        reqs = [parse(cls, x) for x in msgs[:sent]]
        outs = [parse(rcls, x) for x in responses]
        if any(r is None for r in reqs) or not reqs:
            return
        if any(o is None for o in outs):
            issues.append(Issue("bad-response", f"{what}: a response does not parse"))
            return
        fmt = reqs[0].format
        data_in = b"".join(r.data for r in reqs)
        data_out = b"".join(o.data for o in outs)
        if not outs or not outs[-1].final:
            issues.append(Issue("bad-response", f"{what}: OK without a final response"))
            return
        if m == "CompressStream":
            if fmt not in STREAM_FORMATS:
                issues.append(Issue("accepted-invalid", f"{what}: OK for format {fmt}"))
                return
            back = py_decode(fmt, data_out, max(len(data_in), 1) + 1)
            if back != data_in:
                issues.append(Issue("wrong-output", f"{what}: {len(data_in)} bytes in, {len(data_out)} out, the "
                                                    f"reference decodes {'nothing' if back is None else len(back) if back is not OVER else 'more'}"))
                return
        else:
            cap = reqs[0].max_output_bytes
            if cap and len(data_out) > cap:
                issues.append(Issue("cap-exceeded", f"{what}: {len(data_out)} bytes out over max_output_bytes {cap}"))
                return
            if fmt not in STREAM_FORMATS:
                issues.append(Issue("accepted-invalid", f"{what}: OK for format {fmt}"))
                return
            back = py_decode(fmt, data_in, len(data_out) + 1)
            if back is None or back is OVER:
                self.count("lenient_accepts")
                return
            if back != data_out:
                issues.append(Issue("wrong-output", f"{what}: the stream decoded to {len(data_out)} bytes, the "
                                                    f"reference to {len(back)}"))
                return
        if outs[-1].total_in != len(data_in) or outs[-1].total_out != len(data_out):
            issues.append(Issue("bad-response", f"{what}: totals {outs[-1].total_in}/{outs[-1].total_out}, sent "
                                                f"{len(data_in)} received {len(data_out)}"))
            return
        self.count("checked")

    def check_submit(self, step, msgs, sent, code, responses, issues):
        what = f"Submit [{step.get('desc', '')[:160]}]"
        reqs = [parse(pb.SubmitRequest, x) for x in msgs[:sent]]
        valid = step.get("valid") if isinstance(step.get("valid"), list) else [False] * len(msgs)
        by_id = collections.defaultdict(list)
        for i, r in enumerate(reqs):
            if r is not None:
                by_id[r.id].append(i)
        got = collections.Counter()
        tenant = TENANT_OF.get(step.get("auth"))
        for raw in responses:
            r = parse(pb.SubmitResponse, raw)
            if r is None:
                issues.append(Issue("bad-response", f"{what}: a SubmitResponse does not parse"))
                continue
            got[r.id] += 1
            with self.lock:
                self.stats["submit_jobs"] += 1
                self.stats[f"job:{_code_name(r.code)}"] += 1
            jname = _code_name(r.code)
            if jname == "UNKNOWN" or jname == "INTERNAL" and not any(re.search(p, r.message) for p in INTERNAL_ALLOWED):
                issues.append(Issue(f"{jname.lower()}-status", f"{what}: job {r.id!r}: {jname} {r.message!r}"))
            idx = by_id.get(r.id)
            if not idx:
                issues.append(Issue("bad-response", f"{what}: a response for id {r.id!r} that no job carried"))
                continue
            if len(idx) != 1:
                continue  # duplicate ids: which job it answers is not known
            job = reqs[idx[0]]
            # A stream that failed (a malformed message, a deadline) may cancel its jobs in flight.
            if valid[idx[0]] and r.code != 0 and not (r.code == 8 and r.retry_after_ms > 0) and \
                    not (r.code == 1 and code != "OK") and not (step.get("burst") and r.code == 14):
                issues.append(Issue("valid-refused", f"{what}: valid job {r.id!r} ({job.WhichOneof('job')}) got "
                                                     f"{jname} {r.message!r}"))
            if r.code == 0:
                kind = job.WhichOneof("job")
                if r.WhichOneof("result") != kind:
                    issues.append(Issue("bad-response", f"{what}: job {r.id!r} is a {kind}, its result a "
                                                        f"{r.WhichOneof('result')}"))
                    continue
                problem = check_job(kind.capitalize(), getattr(job, kind), getattr(r, kind), tenant)
                if problem and problem[0] == "lenient":
                    self.count("lenient_accepts")
                elif problem:
                    issues.append(Issue(problem[0], f"{what}: job {r.id!r}: {problem[1]}"))
                else:
                    self.count("checked")
        if code == "OK" and step.get("mode", "close") == "close" and all(r is not None for r in reqs):
            want = collections.Counter(r.id for r in reqs)
            if want != got:
                missing = {k: v - got.get(k, 0) for k, v in want.items() if got.get(k, 0) < v}
                extra = {k: v - want.get(k, 0) for k, v in got.items() if want.get(k, 0) < v}
                issues.append(Issue("submit-mismatch", f"{what}: stream OK but responses per id differ: missing "
                                                       f"{dict(list(missing.items())[:5])}, extra "
                                                       f"{dict(list(extra.items())[:5])}"))


_CODE_NAMES = {0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
               6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
               10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
               15: "DATA_LOSS", 16: "UNAUTHENTICATED"}


def _code_name(c):
    return _CODE_NAMES.get(c, f"CODE_{c}")


def _effective_cap(cap):
    return MAX_DECOMPRESSED if cap == 0 else min(cap, MAX_DECOMPRESSED)


def _named_owner_problem(spec, tenant):
    """The problem with an OK answer that used key `spec`, or None."""
    if spec.WhichOneof("source") != "name" or tenant is None:
        return None  # tenant None: an API key variant the server may read either way (e.g. "bearer")
    k = NAMED.get(spec.name)
    if k is None:
        return ("accepted-invalid", f"OK with an unknown key name {spec.name[:40]!r}")
    if k["tenant"] != tenant:
        return ("tenant-isolation", f"tenant {tenant!r} used key {spec.name!r} of tenant {k['tenant']!r}")
    return None


def check_job(method, req, resp, tenant):
    """Checks an OK answer against the references. Returns (kind, detail) or None."""
    if method == "Compress":
        if req.format not in FORMATS:
            return ("accepted-invalid", f"OK for format {req.format}")
        back = py_decode(req.format, resp.data, len(req.data) + 1)
        if back != req.data:
            return ("wrong-output", f"{FORMATS[req.format]} output of {len(resp.data)} bytes does not decode "
                                    f"(reference: {'refused' if back is None else 'longer' if back is OVER else f'{len(back)} bytes'}) "
                                    f"to the {len(req.data)}-byte input")
        if resp.stats.input_bytes != len(req.data) or resp.stats.output_bytes != len(resp.data):
            return ("bad-response", f"stats {resp.stats.input_bytes}/{resp.stats.output_bytes} bytes, real "
                                    f"{len(req.data)}/{len(resp.data)}")
        return None
    if method == "Decompress":
        cap = _effective_cap(req.max_output_bytes)
        if len(resp.data) > cap:
            return ("cap-exceeded", f"{len(resp.data)} bytes out, cap {cap}")
        if req.format not in FORMATS:
            return ("accepted-invalid", f"OK for format {req.format}")
        back = py_decode(req.format, req.data, cap)
        if back is None:
            return ("lenient", "the server decoded what the reference refuses")
        if back is OVER:
            return ("cap-exceeded", f"reference output exceeds the cap {cap}, server said OK")
        if back != resp.data:
            return ("wrong-output", f"{FORMATS[req.format]}: {len(resp.data)} bytes out, reference {len(back)}")
        return None
    if method == "Encrypt":
        p = _named_owner_problem(req.key, tenant)
        if p:
            return p
        comp = req.compress.format if req.HasField("compress") else None
        try:
            if req.key.WhichOneof("source") == "name":
                if req.nonce:
                    return ("accepted-invalid", "OK for a named key with a caller nonce")
                version, body = open_envelope(req.key.name, resp.ciphertext, req.aad)
                if version != resp.key_version or version != newest_version(req.key.name):
                    return ("wrong-output", f"envelope version {version}, response says {resp.key_version}, newest "
                                            f"is {newest_version(req.key.name)}")
            else:
                if req.algorithm not in CIPHERS:
                    return ("accepted-invalid", f"OK for cipher algorithm {req.algorithm}")
                if req.nonce and resp.nonce != req.nonce:
                    return ("wrong-output", "the response nonce is not the caller's")
                if len(resp.nonce) != NONCE:
                    return ("wrong-output", f"a {len(resp.nonce)}-byte nonce")
                body = aead(req.algorithm, req.key.raw).decrypt(resp.nonce, resp.ciphertext, req.aad or None)
        except (InvalidTag, ValueError) as e:
            return ("wrong-output", f"the ciphertext does not open with the reference: {type(e).__name__} {e}")
        if comp is not None:
            back = py_decode(comp, body, len(req.plaintext) + 1) if comp in FORMATS else None
            if back != req.plaintext:
                return ("wrong-output", f"compress-then-encrypt: the opened body ({len(body)} bytes) does not decode "
                                        f"to the {len(req.plaintext)}-byte plaintext")
        elif body != req.plaintext:
            return ("wrong-output", f"opened to {len(body)} bytes, the plaintext has {len(req.plaintext)}")
        return None
    if method == "Decrypt":
        p = _named_owner_problem(req.key, tenant)
        if p:
            return p
        cap = _effective_cap(req.max_output_bytes)
        if len(resp.plaintext) > cap:
            return ("cap-exceeded", f"{len(resp.plaintext)} bytes out, cap {cap}")
        try:
            if req.key.WhichOneof("source") == "name":
                version, body = open_envelope(req.key.name, req.ciphertext, req.aad)
                k = NAMED[req.key.name]
                if version not in usable_versions(req.key.name):
                    return ("accepted-invalid", f"decrypted under retired or disabled version {version} of {req.key.name}")
                if resp.key_version != version:
                    return ("wrong-output", f"key_version {resp.key_version}, envelope {version}")
                del k
            else:
                if req.algorithm not in CIPHERS:
                    return ("accepted-invalid", f"OK for cipher algorithm {req.algorithm}")
                body = aead(req.algorithm, req.key.raw).decrypt(req.nonce, req.ciphertext, req.aad or None)
        except (InvalidTag, ValueError) as e:
            return ("auth-bypass", f"OK, but the reference refuses the ciphertext: {type(e).__name__} {e}")
        if req.HasField("decompress"):
            back = py_decode(req.decompress.format, body, cap) if req.decompress.format in FORMATS else None
            if back is None:
                return ("lenient", "the server decoded what the reference refuses")
            if back is OVER:
                return ("cap-exceeded", f"decompressed plaintext exceeds the cap {cap}, server said OK")
            if back != resp.plaintext:
                return ("wrong-output", f"decrypt+decompress gave {len(resp.plaintext)} bytes, reference {len(back)}")
        elif body != resp.plaintext:
            return ("wrong-output", f"plaintext of {len(resp.plaintext)} bytes, reference {len(body)}")
        return None
    if method == "Digest":
        if req.algorithm not in DIGESTS:
            return ("accepted-invalid", f"OK for digest algorithm {req.algorithm}")
        key = None
        if req.algorithm in KEYED:
            src = req.key.WhichOneof("source")
            if src == "raw":
                key = req.key.raw
            elif src == "name":
                p = _named_owner_problem(req.key, tenant)
                if p:
                    return p
                k = NAMED[req.key.name]
                if k["alg"] != KEYED[req.algorithm]:
                    return ("accepted-invalid", f"{DIGESTS[req.algorithm]} with the {k['alg']} key {req.key.name}")
                key = named_key(req.key.name, newest_version(req.key.name))
            else:
                return ("accepted-invalid", "HMAC without a key")
            if not key:
                return ("accepted-invalid", "HMAC with an empty key")
        elif req.key.WhichOneof("source") is not None:
            return ("accepted-invalid", f"{DIGESTS[req.algorithm]} with a key")
        want = ref_digest(req.algorithm, req.data, key)
        if want is None:
            return None
        if resp.digest != want:
            return ("wrong-output", f"{DIGESTS[req.algorithm]} of {len(req.data)} bytes: {resp.digest.hex()[:32]} != "
                                    f"{want.hex()[:32]}")
        if len(want) == 4 and resp.checksum != struct.unpack(">I", want)[0]:
            return ("wrong-output", f"checksum field {resp.checksum:#x} != {want.hex()}")
        return None
    if method == "DescribeDevice":
        if tenant is not None and resp.tenant.id != tenant:
            return ("tenant-isolation", f"DescribeDevice for {tenant!r} describes tenant {resp.tenant.id!r}")
        if resp.limits.max_request_bytes != MAX_REQUEST:
            return ("bad-response", f"limits.max_request_bytes {resp.limits.max_request_bytes}")
        return None
    if method == "Check":
        return None
    return None


# ======================================================================================
# Generators: each returns a Case. Builders return (message, valid).

def pick_auth(rng):
    r = rng.random()
    if r < 0.84:
        return "alpha"
    if r < 0.90:
        return "beta"
    return rng.choice(list(AUTH))


def pick_timeout(rng):
    """(timeout, normal): normal means a deadline a valid request must meet."""
    r = rng.random()
    if r < 0.88:
        return CALL_S, True
    if r < 0.93:
        return None, True  # the server's default deadline (3 s)
    return rng.choice([1e-6, 1e-4, 0.001, 0.005, 0.02, 0.1, 0.5]), False


def pick_format(rng, valid_p=0.88, formats=tuple(FORMATS)):
    if rng.random() < valid_p:
        return rng.choice(formats)
    return rng.choice(BAD_FORMATS + ([5] if formats == STREAM_FORMATS else []))


def level_ok(fmt, level):
    if level is None or level == -1:
        return True
    lo, hi = LEVELS.get(fmt, (0, 9))
    return lo <= level <= hi


def pick_level(rng, fmt):
    lo, hi = LEVELS.get(fmt, (0, 9))
    r = rng.random()
    if r < 0.35:
        return None
    if r < 0.45:
        return -1
    if r < 0.75:
        return rng.randint(lo, hi)
    if r < 0.85:
        return rng.choice([lo, hi])
    return rng.choice([lo - 1, hi + 1, -2, 10, 13, 20, 22, 100, 255, 256, I32_MAX, I32_MIN])


def maybe_region(rng, msg, out=True):
    """Local-lane spans over TCP (the target has no local lane): always refused."""
    if rng.random() < 0.05:
        span = msg.input_region if rng.random() < 0.6 or not out else msg.output_region
        span.region = rng.choice(["", "r-1", "nope", "x" * 300, "\u00e9\u00e9", "0"])
        span.offset = rng.choice([0, 1, 4096, U32, U64])
        span.length = rng.choice([0, 1, 4096, MiB, U32, U64])
        return True
    return False


def build_compress(rng):
    fmt = pick_format(rng)
    level = pick_level(rng, fmt)
    data = payload(rng, pick_size(rng))
    req = pb.CompressRequest(format=fmt, data=data)
    if level is not None:
        req.level = level
    region = maybe_region(rng, req)
    valid = fmt in FORMATS and level_ok(fmt, level) and len(data) <= MAX_REQUEST and not region
    return req, valid


def compressed_sample(rng, fmt):
    """(data, original or None, exact): a stream for `fmt` (valid or damaged)."""
    orig = payload(rng, pick_size(rng, big=0.01))
    base_fmt = fmt if fmt in FORMATS else rng.choice(list(FORMATS))
    good = py_compress(base_fmt, orig, rng.choice([None, 0, 1, 6, 9]) if base_fmt != 4 else rng.choice([None, 1, 19]))
    kind = pick(rng, [("valid", 30), ("multi", 6), ("truncate", 10), ("flip", 10), ("tail", 6), ("trailer", 5),
                      ("label", 5), ("bomb", 8), ("junk", 5), ("tiny", 6), ("stored", 3), ("prefix", 2)])
    if kind == "valid" or fmt not in FORMATS:
        return good, orig, fmt in FORMATS and kind == "valid", "valid"
    if kind == "multi":
        n = rng.randint(2, 4)
        parts = [payload(rng, rng.choice([0, 1, 100, 5000])) for _ in range(n)]
        data = b"".join(py_compress(fmt, p) for p in parts)
        members = fmt in (3, 4, 5)
        return data, b"".join(parts), members, "multi"
    if kind == "truncate":
        k = rng.choice([0, 1, 2, 3, 4, 9, 10, 11, len(good) // 2, len(good) - 1, len(good) - 4, len(good) - 8,
                        rng.randint(0, max(0, len(good) - 1))])
        return good[:max(0, k)], orig, False, "truncate"
    if kind == "flip":
        return flip(rng, good, rng.randint(1, 4)), orig, False, "flip"
    if kind == "tail":
        return good + rng.choice([b"\x00", b"G", bytes(16), rng.randbytes(rng.randint(1, 64)), good[:10]]), orig, \
            False, "tail"
    if kind == "trailer":
        b = bytearray(good)
        for i in range(rng.randint(1, 4)):
            if len(b) > 8:
                b[-1 - rng.randrange(8)] ^= rng.randint(1, 255)
        return bytes(b), orig, False, "trailer"
    if kind == "label":
        other = rng.choice([f for f in FORMATS if f != fmt])
        return py_compress(other, orig), orig, False, "label"
    if kind == "bomb":
        label, data, size = rng.choice(bombs()[fmt]) if bombs()[fmt] else ("none", good, len(orig))
        return data, None, False, "bomb:" + label
    if kind == "junk":
        return rng.randbytes(rng.choice([1, 2, 16, 100, 4096])), None, False, "junk"
    if kind == "tiny":
        return rng.choice([b"", b"\x00", b"\x03\x00", b"\x01\x00\x00\xff\xff", b"\x78\x9c", b"\x1f\x8b",
                           b"\x28\xb5\x2f\xfd", b"\x04\x22\x4d\x18", b"\xff" * 8]), None, False, "tiny"
    if kind == "stored":
        n = rng.choice([0, 1, 5, 100])
        body = rng.randbytes(n)
        ln = rng.choice([n, n + 1, 0xFFFF])
        raw = b"\x01" + struct.pack("<HH", ln & 0xFFFF, (ln ^ rng.choice([0xFFFF, 0xFFFE])) & 0xFFFF) + body
        return raw, None, False, "stored"
    return rng.randbytes(rng.randint(1, 8)) + good, orig, False, "prefix"


def pick_cap(rng, n):
    r = rng.random()
    if r < 0.55 or n is None:
        return rng.choice([0, 0, 0, 1, 1024, 65536, MAX_DECOMPRESSED, MAX_DECOMPRESSED + 1, U32, U64])
    return max(0, rng.choice([n, n - 1, n + 1, n // 2, 1, U64, U32 + 1 + n]))


def build_decompress(rng):
    fmt = pick_format(rng)
    data, orig, exact, kind = compressed_sample(rng, fmt)
    cap = pick_cap(rng, len(orig) if orig is not None else None)
    req = pb.DecompressRequest(format=fmt, data=data, max_output_bytes=cap)
    region = maybe_region(rng, req)
    valid = exact and orig is not None and len(orig) <= _effective_cap(cap) and len(data) <= MAX_REQUEST and not region
    return req, valid


def pick_raw_key(rng, alg):
    want = CIPHERS[alg][1] if alg in CIPHERS else rng.choice([16, 32])
    if rng.random() < 0.85:
        return rng.randbytes(want), alg in CIPHERS
    return rng.randbytes(rng.choice([0, 1, 8, 15, 17, 24, 31, 33, 48, 64, 1024])), False


def pick_key(rng, alg, tenant, aead_key=True):
    """Fills a KeySpec choice: returns (kind, spec-setter, alg to use, valid, named name)."""
    r = rng.random()
    own_aead = [n for n, k in NAMED.items() if k["tenant"] == tenant and k["alg"] in ALG_NUMBER and
                ALG_NUMBER[k["alg"]] in CIPHERS]
    if r < 0.62 or not own_aead:
        key, ok = pick_raw_key(rng, alg)
        return ("raw", key), ok
    if r < 0.80:
        name = rng.choice(own_aead)
        return ("name", name), True
    if r < 0.86:
        return ("name", rng.choice([n for n in NAMED if NAMED[n]["tenant"] != tenant])), False
    if r < 0.90:
        return ("name", rng.choice([n for n in NAMED if NAMED[n]["tenant"] == tenant and n not in own_aead]
                                   or ["a-hmac256"])), False
    if r < 0.95:
        return ("name", rng.choice(["", "nope", "A-AES256", "a-aes256 ", "x" * 4096, "../a-aes256", "\u00e9"])), False
    return rng.choice([("missing", None), ("empty-spec", None), ("raw", b"")]), False


def apply_key(spec_msg, parent, choice):
    kind, value = choice
    if kind == "raw":
        parent.key.raw = value
    elif kind == "name":
        parent.key.name = value
    elif kind == "empty-spec":
        parent.key.SetInParent()


def pick_cipher(rng):
    return rng.choice(list(CIPHERS)) if rng.random() < 0.85 else rng.choice(BAD_CIPHERS)


def pick_crypto_size(rng):
    """Plaintext sizes: the empty plaintext is the case that matters most for chains."""
    if rng.random() < 0.22:
        return 0
    return pick_size(rng, big=0.015)


def pick_aad(rng):
    r = rng.random()
    if r < 0.6:
        return b""
    if r < 0.9:
        return rng.randbytes(rng.choice([1, 6, 16, 100, 1000]))
    return rng.randbytes(rng.choice([MAX_AAD - 1, MAX_AAD, MAX_AAD + 1]))


def pick_chain(rng, p=0.45):
    """A ChainedCompression (format, level) or None."""
    if rng.random() >= p:
        return None
    fmt = pick_format(rng, 0.92)
    level = pick_level(rng, fmt) if rng.random() < 0.5 else None
    return fmt, level


def set_chain(msg_field, chain_choice):
    fmt, level = chain_choice
    msg_field.format = fmt
    if level is not None:
        msg_field.level = level


def build_encrypt(rng, tenant="alpha"):
    alg = pick_cipher(rng)
    kchoice, key_ok = pick_key(rng, alg, tenant)
    named = kchoice[0] == "name" and key_ok
    req = pb.EncryptRequest(plaintext=payload(rng, pick_crypto_size(rng)), aad=pick_aad(rng))
    alg_ok = alg in CIPHERS
    if named:
        na = ALG_NUMBER[NAMED[kchoice[1]]["alg"]]
        r = rng.random()
        alg = 0 if r < 0.6 else na if r < 0.85 else alg
        alg_ok = alg in (0, na)
    if alg:
        req.algorithm = alg
    apply_key(None, req, kchoice)
    r = rng.random()
    nonce_ok = True
    if r < 0.55 and not named:
        req.nonce = rng.randbytes(NONCE)
    elif r < 0.8:
        pass
    else:
        req.nonce = rng.randbytes(rng.choice([1, 11, 13, 16, 24, 12]))
        nonce_ok = not named and len(req.nonce) == NONCE
    ch = pick_chain(rng, 0.4)
    chain_ok = True
    if ch:
        set_chain(req.compress, ch)
        chain_ok = ch[0] in FORMATS and level_ok(ch[0], ch[1])
    region = maybe_region(rng, req)
    valid = (key_ok and alg_ok and nonce_ok and chain_ok and len(req.aad) <= MAX_AAD and
             len(req.plaintext) <= MAX_REQUEST and not region)
    return req, valid


def build_decrypt(rng, tenant="alpha"):
    alg = pick_cipher(rng)
    kchoice, key_ok = pick_key(rng, alg, tenant)
    named = kchoice[0] == "name" and key_ok
    pt = payload(rng, pick_crypto_size(rng))
    aad = pick_aad(rng)
    if len(aad) > MAX_AAD:
        aad = aad[:MAX_AAD] if rng.random() < 0.5 else aad
    ch = pick_chain(rng, 0.5)
    compressed = False
    body = pt
    if ch and ch[0] in FORMATS and rng.random() < 0.7:
        body = py_compress(ch[0], pt)
        compressed = True
    nonce = rng.randbytes(NONCE)
    seal_alg = alg if alg in CIPHERS else 17
    req = pb.DecryptRequest(aad=aad)
    mutated = False
    if named:
        name = kchoice[1]
        na = ALG_NUMBER[NAMED[name]["alg"]]
        versions = [v for v, _ in NAMED[name]["versions"]]
        version = rng.choice(usable_versions(name)) if rng.random() < 0.8 else rng.choice(versions + [0, 99, U32])
        key_ok = key_ok and version in usable_versions(name)
        if version in versions:
            ct = seal_envelope(name, version, body, aad, nonce)
        else:
            ct = envelope_header(version) + nonce + rng.randbytes(len(body) + TAG)
        r = rng.random()
        req.algorithm = 0 if r < 0.7 else na if r < 0.9 else alg
        alg_ok = req.algorithm in (0, na)
        nonce_ok = True
        if rng.random() < 0.05:
            req.nonce = nonce
            nonce_ok = False
    else:
        key = kchoice[1] if kchoice[0] == "raw" and key_ok else rng.randbytes(CIPHERS[seal_alg][1])
        ct = seal(seal_alg, key, nonce, body, aad)
        if alg:
            req.algorithm = alg
        alg_ok = alg in CIPHERS
        r = rng.random()
        nonce_ok = True
        if r < 0.9:
            req.nonce = nonce
        elif r < 0.95:
            req.nonce = rng.randbytes(rng.choice([0, 1, 11, 13, 16]))
            nonce_ok = False
        else:
            req.nonce = rng.randbytes(NONCE)  # another nonce: the tag fails
            mutated = True
    apply_key(None, req, kchoice)
    if rng.random() < 0.35:
        mutated = True
        m = pick(rng, [("tag", 3), ("ct", 3), ("truncate", 4), ("extend", 1), ("random-tag-length", 3),
                       ("random", 2), ("envelope", 3 if named else 0), ("aad", 1), ("limit", 1)])
        if m == "tag" and ct:
            b = bytearray(ct)
            b[-1 - rng.randrange(min(TAG, len(b)))] ^= 1 << rng.randrange(8)
            ct = bytes(b)
        elif m == "ct":
            ct = flip(rng, ct)
        elif m == "truncate":
            ct = ct[:rng.choice([0, 1, 15, 16, 17, ENVELOPE_OVERHEAD, ENVELOPE_OVERHEAD + 15,
                                 ENVELOPE_OVERHEAD + 16, max(0, len(ct) - 1), len(ct) // 2])]
        elif m == "extend":
            ct = ct + rng.randbytes(rng.choice([1, 16]))
        elif m == "random-tag-length":
            ct = (envelope_header(rng.choice([1, 2, 3])) + rng.randbytes(NONCE) if named else b"") + rng.randbytes(TAG)
        elif m == "random":
            ct = rng.randbytes(rng.choice([0, 1, 15, 16, 17, 33, 34, 35, 100]))
        elif m == "envelope":
            b = bytearray(ct)
            b[rng.randrange(min(6, len(b)))] ^= rng.randint(1, 255)
            ct = bytes(b)
        elif m == "aad":
            req.aad = aad + b"x"
        elif m == "limit":
            ct = rng.randbytes(rng.choice([SEALED_LIMIT, SEALED_LIMIT + 1]))
    req.ciphertext = ct
    chain_ok = True
    if ch:
        set_chain(req.decompress, ch)
        chain_ok = ch[0] in FORMATS and level_ok(ch[0], ch[1]) and compressed
    cap = 0 if rng.random() < 0.75 else rng.choice([1, len(pt), max(0, len(pt) - 1), len(pt) + 1, U64, U32])
    req.max_output_bytes = cap
    region = maybe_region(rng, req)
    valid = (key_ok and alg_ok and nonce_ok and chain_ok and not mutated and len(pt) <= _effective_cap(cap) and
             len(aad) <= MAX_AAD and not region and len(ct) <= SEALED_LIMIT)
    return req, valid


def build_digest(rng, tenant="alpha"):
    alg = rng.choice(list(DIGESTS)) if rng.random() < 0.88 else rng.choice(BAD_DIGESTS)
    req = pb.DigestRequest(algorithm=alg, data=payload(rng, pick_size(rng)))
    keyed = alg in KEYED
    r = rng.random()
    key_ok = not keyed
    if keyed and r < 0.6 or not keyed and r < 0.1:
        req.key.raw = rng.randbytes(rng.choice([1, 16, 32, 64, 65, 128, 129, 1000, 0]))
        key_ok = keyed and len(req.key.raw) > 0
    elif r < 0.75:
        own = [n for n, k in NAMED.items() if k["tenant"] == tenant and k["alg"].startswith("hmac")]
        if rng.random() < 0.7 and own:
            name = rng.choice(own)
        else:
            name = rng.choice(list(NAMED) + ["nope", ""])
        req.key.name = name
        key_ok = keyed and name in NAMED and NAMED[name]["tenant"] == tenant and NAMED[name]["alg"] == KEYED[alg]
    elif r < 0.8:
        req.key.SetInParent()  # a KeySpec with no source: the same as no key
    region = maybe_region(rng, req, out=False)
    valid = alg in DIGESTS and key_ok and len(req.data) <= MAX_REQUEST and not region
    return req, valid


JOB_BUILDERS = {"compress": build_compress, "decompress": build_decompress, "encrypt": build_encrypt,
                "decrypt": build_decrypt, "digest": build_digest}
UNARY_OF = {"compress": "Compress", "decompress": "Decompress", "encrypt": "Encrypt", "decrypt": "Decrypt",
            "digest": "Digest"}


def build_job(rng, kind, auth):
    tenant = TENANT_OF.get(auth, "alpha")
    b = JOB_BUILDERS[kind]
    return b(rng, tenant) if kind in ("encrypt", "decrypt", "digest") else b(rng)


def _unary_case(name, rng, kind):
    auth = pick_auth(rng)
    req, valid = build_job(rng, kind, auth)
    timeout, normal = pick_timeout(rng)
    if timeout is None and len(req.SerializeToString()) > 2 * MiB:
        timeout = CALL_S  # the 3 s server default is for small jobs only
    ok = valid and normal and auth in TENANT_OF
    return Case(name, [unary(UNARY_OF[kind], req, auth, timeout, ok)], tag=("valid" if ok else "edge"))


def g_compress(rng):
    return _unary_case("compress", rng, "compress")


def g_decompress(rng):
    return _unary_case("decompress", rng, "decompress")


def g_encrypt(rng):
    return _unary_case("encrypt", rng, "encrypt")


def g_decrypt(rng):
    return _unary_case("decrypt", rng, "decrypt")


def g_digest(rng):
    return _unary_case("digest", rng, "digest")


def g_chain(rng):
    """Compress and encrypt in every order through the server, then back, with the
    empty plaintext often; each step is fed the previous answers."""
    auth = rng.choice(["alpha"] * 4 + ["beta"])
    tenant = TENANT_OF[auth]
    pt = payload(rng, pick_crypto_size(rng))
    fmt = pick_format(rng, 0.93)
    level = pick_level(rng, fmt) if rng.random() < 0.4 else None
    fmt_ok = fmt in FORMATS and level_ok(fmt, level)
    own = [n for n, k in NAMED.items() if k["tenant"] == tenant and ALG_NUMBER.get(k["alg"]) in CIPHERS]
    use_name = rng.random() < 0.35
    alg = rng.choice(list(CIPHERS))
    key = rng.randbytes(CIPHERS[alg][1])
    name = rng.choice(own)
    aad = pick_aad(rng) if rng.random() < 0.4 else b""
    aad_ok = len(aad) <= MAX_AAD
    small = len(pt) <= MAX_REQUEST - 64 * KiB  # near the limit a compressed or sealed form may not fit

    def enc(plain=b"", compress=False):
        r = pb.EncryptRequest(plaintext=plain, aad=aad)
        if use_name:
            r.key.name = name
        else:
            r.algorithm, r.key.raw = alg, key
        if compress:
            r.compress.format = fmt
            if level is not None:
                r.compress.level = level
        return r

    def dec(decompress=False):
        r = pb.DecryptRequest(aad=aad)
        if use_name:
            r.key.name = name
        else:
            r.algorithm, r.key.raw = alg, key
        if decompress:
            r.decompress.format = fmt
            if level is not None:
                r.decompress.level = level
        return r

    ct_links = [[0, "ciphertext", "ciphertext"]] + ([] if use_name else [[0, "nonce", "nonce"]])
    order = rng.choice(["E(c)-D(d)", "C-E-D-Dc", "E-C-Dc-D", "E(c)-D-Dc", "E-D(d)", "E(c)-D(d)", "E(c)-D(d)"])
    base = aad_ok and small
    fmt_ok = fmt_ok and small
    if order == "E(c)-D(d)":
        calls = [unary("Encrypt", enc(pt, True), auth, valid=base and fmt_ok),
                 unary("Decrypt", dec(True), auth, valid=base and fmt_ok)]
        links = [[], ct_links]
        rt = [[0, "plaintext"], [1, "plaintext"]]
    elif order == "C-E-D-Dc":
        c = pb.CompressRequest(format=fmt, data=pt)
        if level is not None:
            c.level = level
        dc = pb.DecompressRequest(format=fmt)
        links2 = [[1, "ciphertext", "ciphertext"]] + ([] if use_name else [[1, "nonce", "nonce"]])
        calls = [unary("Compress", c, auth, valid=fmt_ok), unary("Encrypt", enc(), auth, valid=base and fmt_ok),
                 unary("Decrypt", dec(), auth, valid=base and fmt_ok),
                 unary("Decompress", dc, auth, valid=base and fmt_ok and len(pt) <= MAX_DECOMPRESSED)]
        links = [[], [[0, "data", "plaintext"]], links2, [[2, "plaintext", "data"]]]
        rt = [[0, "data"], [3, "data"]]
    elif order == "E-C-Dc-D":
        c = pb.CompressRequest(format=fmt)
        if level is not None:
            c.level = level
        calls = [unary("Encrypt", enc(pt), auth, valid=base), unary("Compress", c, auth, valid=base and fmt_ok),
                 unary("Decompress", pb.DecompressRequest(format=fmt), auth, valid=base and fmt_ok),
                 unary("Decrypt", dec(), auth, valid=base and fmt_ok)]
        links = [[], [[0, "ciphertext", "data"]], [[1, "data", "data"]],
                 [[2, "data", "ciphertext"]] + ([] if use_name else [[0, "nonce", "nonce"]])]
        rt = [[0, "plaintext"], [3, "plaintext"]]
    elif order == "E(c)-D-Dc":
        calls = [unary("Encrypt", enc(pt, True), auth, valid=base and fmt_ok),
                 unary("Decrypt", dec(), auth, valid=base and fmt_ok),
                 unary("Decompress", pb.DecompressRequest(format=fmt), auth, valid=base and fmt_ok)]
        links = [[], ct_links, [[1, "plaintext", "data"]]]
        rt = [[0, "plaintext"], [2, "data"]]
    else:  # E-D(d): the plaintext was never compressed, decompress-after must refuse it
        calls = [unary("Encrypt", enc(pt), auth, valid=base), unary("Decrypt", dec(True), auth)]  # never valid
        links = [[], ct_links]
        rt = None
    return Case("chain", [chain(calls, links, rt)], tag=f"{order} {len(pt)}B {FORMATS.get(fmt, fmt)}"
                                                           f"{' named' if use_name else ''}")


def g_describe(rng):
    auth = pick_auth(rng)
    data = b""
    if rng.random() < 0.3:  # unknown fields are skipped by proto3: still a valid request
        data = field_varint(rng.randint(1, 500), rng.getrandbits(40)) + field_bytes(rng.randint(1, 500),
                                                                                     rng.randbytes(rng.randint(0, 50)))
    return Case("describe", [unary("DescribeDevice", data, auth, valid=auth in TENANT_OF)], tag=auth)


def g_health(rng):
    service = rng.choice(["", "", "accelgate.v1.Accelerator", "grpc.health.v1.Health", "nope", "x" * 70000,
                          "\u00e9t\u00e9", "accelgate.v1.Accelerator\x00"])
    req = hpb.HealthCheckRequest(service=service)
    auth = rng.choice(["none", "alpha", "wrong", "huge"])
    if rng.random() < 0.6:
        return Case("health", [unary(HEALTH_CHECK, req, auth, valid=service == "" and auth != "huge")], tag="check")
    t = rng.choice([0.2, 0.5, 1.0])
    mode = rng.choice(["close", "cancel"])
    return Case("health", [stream(HEALTH_WATCH, [req], auth, timeout=t, mode=mode, cut=1,
                                  cancel_after=rng.uniform(0, t), shape="ustream")], tag=f"watch-{mode}")


def _submit_msgs(rng, auth, n):
    msgs, valid = [], []
    ids = [f"j{i}" for i in range(n)]
    if rng.random() < 0.15:
        ids = [rng.choice(["", "dup", "j0", "\u00e9", "x" * rng.choice([100, 70000])]) for _ in range(n)]
    for i in range(n):
        r = rng.random()
        if r < 0.04:
            msgs.append(pb.SubmitRequest(id=ids[i]))  # no job at all
            valid.append(False)
            continue
        if r < 0.07:
            msgs.append(rng.randbytes(rng.randint(1, 40)))
            valid.append(False)
            continue
        kind = rng.choice(list(JOB_BUILDERS))
        job, ok = build_job(rng, kind, auth)
        has_region = any(f.name.endswith("_region") for f, _ in job.ListFields())
        m = pb.SubmitRequest(id=ids[i])
        getattr(m, kind).CopyFrom(job)
        msgs.append(m)
        valid.append(ok and not has_region and auth in TENANT_OF)
    return msgs, valid


def g_submit(rng):
    auth = pick_auth(rng)
    n = rng.choice([0, 1, 2, 3, 5, 8, 12, 20, 40])
    msgs, valid = _submit_msgs(rng, auth, n)
    r = rng.random()
    if r < 0.72:
        return Case("submit", [stream("Submit", msgs, auth, valid=valid)], tag=f"{n} jobs")
    cut = rng.randint(0, n)
    if r < 0.86:
        return Case("submit", [stream("Submit", msgs, auth, mode="cancel", cut=cut, cancel_after=rng.uniform(0, 0.3),
                                      valid=valid)], tag=f"{n} jobs cancel after {cut}")
    return Case("submit", [stream("Submit", msgs, auth, timeout=rng.choice([0.3, 1.0, 2.0]), mode="hold", cut=cut,
                                  valid=valid)], tag=f"{n} jobs, {cut} sent, held open")


def _compress_stream_msgs(rng):
    fmt = pick_format(rng, 0.85, STREAM_FORMATS)
    level = pick_level(rng, fmt)
    n = rng.choice([0, 1, 1, 2, 3, 5, 8, 16])
    msgs = []
    for i in range(n):
        m = pb.CompressStreamRequest(data=payload(rng, pick_size(rng, big=0.01) if rng.random() < 0.8
                                                  else rng.choice([0, 1])))
        if i == 0 or rng.random() < 0.1:
            m.format = fmt if i == 0 else pick_format(rng)
            if level is not None:
                m.level = level if i == 0 else rng.randint(-3, 25)
        msgs.append(m)
    final = pick(rng, [("last", 6), ("none", 3), ("early", 1), ("empty-last", 1)])
    early = False
    if msgs and final == "last":
        msgs[-1].final = True
    elif msgs and final == "early":
        msgs[rng.randrange(len(msgs))].final = True
        early = not msgs[-1].final
    elif final == "empty-last":
        msgs.append(pb.CompressStreamRequest(final=True))
        if len(msgs) == 1:
            msgs[0].format = fmt
    ok = (bool(msgs) and msgs[0].format in STREAM_FORMATS and level_ok(msgs[0].format, level)
          and not early and all(len(m.data) <= MAX_REQUEST for m in msgs))
    return msgs, ok


def _decompress_stream_msgs(rng):
    fmt = pick_format(rng, 0.85, STREAM_FORMATS)
    data, orig, exact, kind = compressed_sample(rng, fmt if fmt in STREAM_FORMATS else 3)
    bomb = kind.startswith("bomb")
    if bomb:
        cap = rng.choice([1, 65536, MiB, 4 * MiB, 8 * MiB])
    else:
        cap = pick_cap(rng, len(orig) if orig is not None else None)
    # split into chunks: 1-byte chunks, random cuts, or one piece
    cuts = pick(rng, [("one", 3), ("random", 5), ("bytes", 1), ("halves", 2)])
    if cuts == "one" or not data:
        pieces = [data]
    elif cuts == "bytes":
        pieces = [data[i:i + 1] for i in range(min(len(data), 200))] + ([data[200:]] if len(data) > 200 else [])
    elif cuts == "halves":
        k = len(data) // 2
        pieces = [data[:k], data[k:]]
    else:
        points = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(1, 12)))
        pieces = [data[a:b] for a, b in zip([0] + points, points + [len(data)])]
    msgs = []
    for i, p in enumerate(pieces):
        m = pb.DecompressStreamRequest(data=p)
        if i == 0:
            m.format = fmt
            m.max_output_bytes = cap
        msgs.append(m)
    if rng.random() < 0.75:
        msgs[-1].final = True
    elif rng.random() < 0.3:
        msgs.append(pb.DecompressStreamRequest(data=b"late", final=True))
        msgs[max(0, len(msgs) - 2)].final = True
        exact = False
    ok = (exact and orig is not None and fmt in STREAM_FORMATS and (cap == 0 or len(orig) <= cap)
          and all(len(m.data) <= MAX_REQUEST for m in msgs))
    return msgs, ok, bomb


def _stream_mode(rng, n):
    r = rng.random()
    if r < 0.75:
        return {"mode": "close"}
    if r < 0.9:
        return {"mode": "cancel", "cut": rng.randint(0, n), "cancel_after": rng.uniform(0, 0.3)}
    return {"mode": "hold", "cut": rng.randint(0, n), "timeout": rng.choice([0.3, 1.0])}


def g_compress_stream(rng):
    auth = pick_auth(rng)
    msgs, ok = _compress_stream_msgs(rng)
    mode = _stream_mode(rng, len(msgs))
    valid = ok and mode["mode"] == "close" and auth in TENANT_OF
    return Case("compress_stream", [stream("CompressStream", msgs, auth, valid=valid, **mode)],
                tag=f"{len(msgs)} msgs {mode['mode']}")


def g_decompress_stream(rng):
    auth = pick_auth(rng)
    msgs, ok, bomb = _decompress_stream_msgs(rng)
    mode = _stream_mode(rng, len(msgs))
    if rng.random() < 0.05 and mode["mode"] == "close":
        mode["read_delay"] = 0.5  # a slow reader
    valid = ok and mode["mode"] == "close" and auth in TENANT_OF
    return Case("decompress_stream", [stream("DecompressStream", msgs, auth, valid=valid, **mode)],
                tag=f"{len(msgs)} msgs {mode['mode']}{' bomb' if bomb else ''}")


def g_many_streams(rng):
    """Many streams at once on one connection (or each on its own), some cancelled,
    some held open, some never read, mixed with unary calls."""
    n = rng.choice([8, 16, 32, 64, 64, 128, MAX_CONCURRENT_STREAMS + 8])
    fresh = rng.random() < 0.2 and n <= 64
    steps = []
    for _ in range(n):
        what = rng.choice(["cs", "ds", "submit", "unary", "cs"])
        mode = rng.choice([{"mode": "close"}, {"mode": "close"}, {"mode": "cancel", "cut": 1, "cancel_after":
                                                                   rng.uniform(0, 0.5)},
                           {"mode": "hold", "cut": 1, "timeout": rng.choice([0.5, 1.5])}])
        if what == "cs":
            msgs = [pb.CompressStreamRequest(format=rng.choice(STREAM_FORMATS), data=payload(rng, rng.randint(0, 3000)))]
            if rng.random() < 0.5:
                msgs.append(pb.CompressStreamRequest(data=payload(rng, rng.randint(0, 3000)), final=True))
            steps.append(stream("CompressStream", msgs, "alpha", valid=mode["mode"] == "close",
                                fresh=fresh, **mode))
        elif what == "ds":
            msgs, _, _ = _decompress_stream_msgs(rng)
            steps.append(stream("DecompressStream", msgs, "alpha", fresh=fresh, **mode))
        elif what == "submit":
            msgs, valid = _submit_msgs(rng, "alpha", rng.randint(1, 4))
            steps.append(stream("Submit", msgs, "alpha", valid=valid if mode["mode"] == "close" else None,
                                fresh=fresh, **mode))
        else:
            req, ok = build_compress(rng)
            steps.append(unary("Compress", req, "alpha", valid=ok, fresh=fresh))
    for s in steps:
        s["burst"] = True
    return Case("many_streams", [parallel(steps)], tag=f"{n} at once{' (own connections)' if fresh else ''}")


def g_auth(rng):
    auth = rng.choice([a for a in AUTH if a not in ("alpha",)])
    kind = rng.choice(["compress", "digest", "encrypt", "describe", "submit", "stream"])
    if kind == "describe":
        return Case("auth", [unary("DescribeDevice", b"", auth, valid=auth in TENANT_OF)], tag=auth)
    if kind == "submit":
        msgs, valid = _submit_msgs(rng, auth, 2)
        return Case("auth", [stream("Submit", msgs, auth, valid=valid)], tag=auth + " submit")
    if kind == "stream":
        msgs, ok = _compress_stream_msgs(rng)
        return Case("auth", [stream("CompressStream", msgs, auth, valid=ok and auth in TENANT_OF)], tag=auth + " stream")
    req, ok = build_job(rng, kind, auth)
    return Case("auth", [unary(UNARY_OF[kind], req, auth, valid=ok and auth in TENANT_OF)], tag=f"{auth} {kind}")


def g_deadline(rng):
    """Tiny, expired and short deadlines, and cancellation, on heavy jobs."""
    kind = rng.choice(["compress", "decompress-bomb", "encrypt", "digest", "stream", "submit"])
    t = rng.choice([1e-7, 1e-5, 1e-3, 0.005, 0.02, 0.05, 0.2])
    cancel = rng.random() < 0.35
    big = payload(rng, rng.choice([MiB, 2 * MiB, MAX_REQUEST]))
    if kind == "compress":
        req = pb.CompressRequest(format=rng.choice(list(FORMATS)), data=big, level=9 if rng.random() < 0.5 else 1)
        if req.format == 4:
            req.level = 19
    elif kind == "decompress-bomb":
        fmt = rng.choice(list(FORMATS))
        label, data, _ = rng.choice(bombs()[fmt] or bombs()[1])
        req = pb.DecompressRequest(format=fmt if bombs()[fmt] else 1, data=data)
    elif kind == "encrypt":
        req = pb.EncryptRequest(algorithm=17, plaintext=big)
        req.key.raw = rng.randbytes(32)
        req.compress.format = rng.choice(list(FORMATS))
    elif kind == "digest":
        req = pb.DigestRequest(algorithm=rng.choice([32, 34, 37]), data=big)
    elif kind == "stream":
        msgs = [pb.CompressStreamRequest(format=3, level=9, data=big)] + \
               [pb.CompressStreamRequest(data=payload(rng, MiB)) for _ in range(rng.randint(0, 3))]
        msgs[-1].final = True
        if cancel:
            return Case("deadline", [stream("CompressStream", msgs, "alpha", mode="cancel", cut=len(msgs),
                                            cancel_after=rng.uniform(0, 0.2))], tag="stream cancel")
        return Case("deadline", [stream("CompressStream", msgs, "alpha", timeout=t)], tag=f"stream {t}")
    else:
        msgs, _ = _submit_msgs(rng, "alpha", 6)
        return Case("deadline", [stream("Submit", msgs, "alpha", timeout=t)], tag=f"submit {t}")
    method = {pb.CompressRequest: "Compress", pb.DecompressRequest: "Decompress", pb.EncryptRequest: "Encrypt",
              pb.DigestRequest: "Digest"}[type(req)]
    if cancel:
        return Case("deadline", [unary(method, req, "alpha", timeout=CALL_S, cancel_after=rng.uniform(0, 0.05))],
                    tag=f"{kind} cancel")
    if rng.random() < 0.15:  # no client deadline: the server's default must end it
        return Case("deadline", [unary(method, req, "alpha", timeout=None)], tag=f"{kind} server default")
    return Case("deadline", [unary(method, req, "alpha", timeout=t)], tag=f"{kind} {t}")


def mutate_bytes(rng, data):
    """Malformed serialized messages."""
    m = pick(rng, [("flip", 4), ("truncate", 3), ("insert", 2), ("unknown", 2), ("groups", 1), ("wire", 2),
                   ("length", 2), ("overlong", 1), ("repeat", 1), ("zero-tag", 1), ("huge-field", 1)])
    if m == "flip":
        return flip(rng, data, rng.randint(1, 6)) if data else rng.randbytes(3), m
    if m == "truncate":
        return data[:rng.randint(0, max(0, len(data) - 1))], m
    if m == "insert":
        at = rng.randint(0, len(data))
        return data[:at] + rng.randbytes(rng.randint(1, 16)) + data[at:], m
    if m == "unknown":
        return data + field_bytes(rng.randint(17, 536870911), rng.randbytes(rng.randint(0, 64))), m
    if m == "groups":  # unknown field number 100 as nested groups (start 803, end 804)
        depth = rng.choice([10, 100, 1000, 10000, 100000])
        return data + varint((100 << 3) | 3) * depth + varint((100 << 3) | 4) * depth, f"groups-{depth}"
    if m == "wire":  # a known field with the wrong wire type
        num = rng.randint(1, 16)
        wt = rng.choice([0, 1, 2, 5])
        body = {0: varint(rng.getrandbits(64)), 1: rng.randbytes(8), 2: varint(3) + b"abc", 5: rng.randbytes(4)}[wt]
        return data + varint((num << 3) | wt) + body, m
    if m == "length":  # a length-delimited field whose length runs past the end
        return data + varint((3 << 3) | 2) + varint(rng.choice([1 << 20, U32, 1 << 62, 100])) + b"short", m
    if m == "overlong":
        return varint(8) + b"\x81\x80\x80\x80\x80\x80\x80\x80\x80\x80\x00" + data, m
    if m == "repeat":
        return data + field_varint(1, rng.choice([1, 3, 17, 32])) * rng.choice([100, 10000]), m
    if m == "zero-tag":
        return b"\x00" + data, m
    return data + field_bytes(rng.choice([15, 16, 3, 5]), bytes(rng.choice([MAX_REQUEST + 1, 8 * MiB]))), m


def _valid_bytes_for(rng, path):
    m = path[len(SVC):] if path.startswith(SVC) else None
    kinds = {"Compress": "compress", "Decompress": "decompress", "Encrypt": "encrypt", "Decrypt": "decrypt",
             "Digest": "digest"}
    if m in kinds:
        return build_job(rng, kinds[m], "alpha")[0].SerializeToString()
    if m == "Submit":
        m = _submit_msgs(rng, "alpha", 1)[0][0]
        return m if isinstance(m, bytes) else m.SerializeToString()
    if m == "CompressStream":
        msgs = _compress_stream_msgs(rng)[0]
        return msgs[0].SerializeToString() if msgs else b""
    if m == "DecompressStream":
        return _decompress_stream_msgs(rng)[0][0].SerializeToString()
    if path in (HEALTH_CHECK, HEALTH_WATCH):
        return hpb.HealthCheckRequest(service="").SerializeToString()
    if path in REFLECTION:
        return field_bytes(7, b"")
    return b""


def g_raw_unary(rng):
    """Malformed or random bytes to every unary path and to paths the server has not."""
    path = rng.choice([SVC + m for m in UNARY_METHODS] * 3 + [HEALTH_CHECK] + UNKNOWN_PATHS)
    r = rng.random()
    if r < 0.35:
        data, how = rng.randbytes(rng.choice([0, 1, 2, 5, 16, 100, 1000, 70000])), "random"
    else:
        data, how = mutate_bytes(rng, _valid_bytes_for(rng, path))
    auth = "alpha" if rng.random() < 0.85 else pick_auth(rng)
    if rng.random() < 0.1:  # a unary method called as a stream of 0, 2 or 3 messages
        n = rng.choice([0, 2, 3])
        return Case("raw_unary", [stream(path, [data] * n, auth)], tag=f"{how} as a stream of {n}")
    return Case("raw_unary", [unary(path, data, auth)], tag=how)


def g_raw_stream(rng):
    """Garbage chunk sequences on the streaming paths: random and mutated messages,
    valid ones in between, a sender that stops half way."""
    path = rng.choice([SVC + m for m in STREAM_METHODS] * 2 + REFLECTION + [HEALTH_WATCH])
    n = rng.choice([1, 2, 3, 6, 12])
    msgs, hows = [], []
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            msgs.append(rng.randbytes(rng.choice([0, 1, 3, 40, 1000])))
            hows.append("random")
        elif r < 0.65:
            d, how = mutate_bytes(rng, _valid_bytes_for(rng, path))
            msgs.append(d)
            hows.append(how)
        else:
            msgs.append(_valid_bytes_for(rng, path))
            hows.append("valid")
    mode = _stream_mode(rng, n)
    if path == HEALTH_WATCH:
        mode = {"mode": "cancel", "cut": n, "cancel_after": 0.2}
    return Case("raw_stream", [stream(path, msgs, "alpha", **mode)], tag=",".join(hows)[:80])


def g_reflection(rng):
    path = rng.choice(REFLECTION)
    options = [field_bytes(7, b""), field_bytes(4, b"accelgate.v1.Accelerator"),
               field_bytes(3, b"accelgate/v1/accelerator.proto"), field_bytes(4, b"accelgate.v1.Nope"),
               field_bytes(3, b"../../etc/passwd"), field_bytes(4, b"x" * 10000),
               field_bytes(5, field_bytes(1, b"accelgate.v1.CompressRequest") + field_varint(2, 99)),
               field_bytes(6, b"accelgate.v1.CompressRequest"), field_bytes(1, b"host") + field_bytes(7, b"*"), b""]
    msgs = [rng.choice(options) for _ in range(rng.randint(1, 5))]
    valid = all(m == options[0] for m in msgs)
    return Case("reflection", [stream(path, msgs, rng.choice(["none", "alpha"]), valid=valid)],
                tag=f"{len(msgs)} requests")


def g_limits(rng):
    """Exactly at and one past the documented limits."""
    which = rng.choice(["compress", "decompress-out", "encrypt-pt", "encrypt-aad", "decrypt-ct", "digest",
                        "transport", "stream-chunk", "submit-job"])
    at = rng.random() < 0.5
    n = MAX_REQUEST if at else MAX_REQUEST + 1
    if which == "compress":
        return Case("limits", [unary("Compress", pb.CompressRequest(format=rng.choice(list(FORMATS)), level=1,
                                                                    data=payload(rng, n)), valid=at)], tag=f"{which} {n}")
    if which == "decompress-out":
        size = MAX_DECOMPRESSED if at else MAX_DECOMPRESSED + 1
        fmt = rng.choice(list(FORMATS))
        return Case("limits", [unary("Decompress", pb.DecompressRequest(format=fmt, data=py_compress(fmt, bytes(size), 9)),
                                     valid=at)], tag=f"{which} {size}")
    if which == "encrypt-pt":
        req = pb.EncryptRequest(algorithm=18, plaintext=payload(rng, n))
        req.key.raw = rng.randbytes(32)
        return Case("limits", [unary("Encrypt", req, valid=at)], tag=f"{which} {n}")
    if which == "encrypt-aad":
        size = MAX_AAD if at else MAX_AAD + 1
        req = pb.EncryptRequest(algorithm=16, plaintext=b"p", aad=rng.randbytes(size))
        req.key.raw = rng.randbytes(16)
        return Case("limits", [unary("Encrypt", req, valid=at)], tag=f"{which} {size}")
    if which == "decrypt-ct":
        key, nonce = rng.randbytes(32), rng.randbytes(NONCE)
        v = rng.choice(["plain-at-cap", "plain-over-cap", "sealed-limit"])
        if v == "sealed-limit":  # the largest ciphertext Decrypt takes (a forged one), and one byte more
            req = pb.DecryptRequest(algorithm=17, nonce=nonce, ciphertext=rng.randbytes(SEALED_LIMIT + (0 if at else 1)))
            req.decompress.format = rng.choice(list(FORMATS))
            at = False
        else:
            n = MAX_DECOMPRESSED if v == "plain-at-cap" else MAX_DECOMPRESSED + 1
            req = pb.DecryptRequest(algorithm=17, nonce=nonce, ciphertext=seal(17, key, nonce, payload(rng, n), b""))
            at = v == "plain-at-cap"
        req.key.raw = key
        return Case("limits", [unary("Decrypt", req, valid=at)], tag=f"{which} {v} {len(req.ciphertext)}")
    if which == "digest":
        return Case("limits", [unary("Digest", pb.DigestRequest(algorithm=38, data=payload(rng, n)), valid=at)],
                    tag=f"{which} {n}")
    if which == "transport":
        # a Compress message of exactly the transport limit, or one byte more
        overhead = len(pb.CompressRequest(format=1, data=bytes(TRANSPORT_LIMIT)).SerializeToString()) - TRANSPORT_LIMIT
        size = TRANSPORT_LIMIT - overhead + (0 if at else 1)
        data = bytes(size)
        return Case("limits", [unary("Compress", pb.CompressRequest(format=1, data=data))],
                    tag=f"{which} message {size + overhead}")
    if which == "stream-chunk":
        msgs = [pb.CompressStreamRequest(format=2, data=payload(rng, n), final=True)]
        return Case("limits", [stream("CompressStream", msgs, valid=at)], tag=f"{which} {n}")
    m = pb.SubmitRequest(id="big")
    m.compress.format = 3
    m.compress.data = payload(rng, n)
    return Case("limits", [stream("Submit", [m], valid=[at])], tag=f"{which} {n}")


# -- raw HTTP/2 --------------------------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_frame(ftype, flags, sid, payload_):
    return struct.pack(">I", len(payload_))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid & 0x7FFFFFFF) + payload_


def hpack_int(v, prefix_bits, first=0):
    limit = (1 << prefix_bits) - 1
    if v < limit:
        return bytes([first | v])
    out = bytearray([first | limit])
    v -= limit
    while v >= 128:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def hpack_lit(name, value):
    name, value = (name.encode() if isinstance(name, str) else name), (value.encode() if isinstance(value, str) else value)
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


def h2_request_headers(path, auth="alpha", extra=(), drop=()):
    hs = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "127.0.0.1"),
          ("content-type", "application/grpc"), ("te", "trailers")] + [(k, v) for k, v in AUTH[auth]]
    hs = [(k, v) for k, v in hs if k not in drop] + list(extra)
    return b"".join(hpack_lit(k, v) for k, v in hs)


def grpc_message(data, flag=0, length=None):
    return bytes([flag]) + struct.pack(">I", (len(data) if length is None else length) & U32) + data


def g_h2raw(rng):
    """HTTP/2 below grpcio: lying gRPC length prefixes, the compressed flag without an
    encoding, bad frames and settings, floods, resets, a sender that stops in a frame."""
    path = rng.choice([SVC + m for m in UNARY_METHODS + STREAM_METHODS] + [HEALTH_CHECK])
    body = _valid_bytes_for(rng, path)
    out = bytearray(H2_PREFACE + h2_frame(4, 0, 0, b""))
    parts = []
    expect = {}
    sid = 1
    for _ in range(rng.randint(1, 3)):
        s = pick(rng, [("lying-length", 3), ("compressed-flag", 2), ("huge-length", 2), ("split", 2),
                       ("rapid-reset", 1), ("ping-flood", 1), ("bad-settings", 2), ("window", 2),
                       ("continuation", 1), ("bad-hpack", 2), ("bad-stream-ids", 2), ("random-frames", 2),
                       ("half-frame", 1), ("headers-only", 1), ("client-trailers", 1), ("bad-headers", 2),
                       ("good", 2), ("expired-deadline", 3)])
        parts.append(s)
        hdr = h2_request_headers(path)
        if s == "good":
            out += h2_frame(1, 4, sid, hdr) + h2_frame(0, 1, sid, grpc_message(body))
            expect[sid] = {"path": path, "jobs": 1 if path.endswith("/Submit") else 0, "note": "one job"}
        elif s == "expired-deadline":
            # a deadline that has passed (or passes) as the server reads the request
            to = rng.choice(["0n", "1n", "100n", "1u", "0S", "1m", "3m"])
            p = rng.choice([SVC + "Submit"] * 3 + [SVC + m for m in UNARY_METHODS + STREAM_METHODS[1:]])
            if p.endswith("/Submit"):
                n = rng.randint(1, 6)
                msgs = b""
                for j in range(n):
                    m = pb.SubmitRequest(id=f"j{j}")
                    m.digest.algorithm = 38
                    m.digest.data = payload(rng, rng.choice([0, 10, 1000]))
                    msgs += grpc_message(m.SerializeToString())
            else:
                n, msgs = 0, grpc_message(_valid_bytes_for(rng, p))
            out += h2_frame(1, 4, sid, h2_request_headers(p, extra=[("grpc-timeout", to)])) + h2_frame(0, 1, sid, msgs)
            expect[sid] = {"path": p, "jobs": n, "note": f"grpc-timeout {to}"}
            parts[-1] = f"expired-deadline({to})"
        elif s == "lying-length":
            out += h2_frame(1, 4, sid, hdr) + h2_frame(0, 1, sid, grpc_message(body, length=len(body) +
                                                                             rng.choice([1, 100, 1 << 20])))
        elif s == "compressed-flag":
            extra = [("grpc-encoding", rng.choice(["gzip", "identity", "br", "zstd", "x"]))] if rng.random() < 0.5 else []
            msg = gzip.compress(body) if extra and extra[0][1] == "gzip" and rng.random() < 0.5 else body
            out += h2_frame(1, 4, sid, h2_request_headers(path, extra=extra)) + \
                h2_frame(0, 1, sid, grpc_message(msg, flag=rng.choice([1, 2, 0x80, 0xFF])))
        elif s == "huge-length":
            out += h2_frame(1, 4, sid, hdr) + h2_frame(0, 0, sid, grpc_message(b"", length=rng.choice(
                [U32, 1 << 31, TRANSPORT_LIMIT + 1, MAX_REQUEST + 1])) + rng.randbytes(100))
        elif s == "split":
            msg = grpc_message(body)
            out += h2_frame(1, 4, sid, hdr)
            for i in range(0, len(msg), 1):
                out += h2_frame(0, 0, sid, msg[i:i + 1])
                if i > 2000:
                    break
            out += h2_frame(0, 1, sid, b"")
        elif s == "rapid-reset":
            for _ in range(rng.choice([50, 300, 1000])):
                out += h2_frame(1, 4, sid, hdr) + h2_frame(3, 0, sid, struct.pack(">I", 8))
                sid += 2
        elif s == "ping-flood":
            for i in range(rng.choice([100, 1000])):
                out += h2_frame(6, 0, 0, struct.pack(">Q", i))
        elif s == "bad-settings":
            pairs = [(rng.choice([1, 2, 3, 4, 5, 6, 8, 0, 0xFFFF]), rng.choice([0, 1, 2, 16383, 1 << 24, 1 << 31, U32]))
                     for _ in range(rng.randint(1, 4))]
            out += h2_frame(4, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))
            if rng.random() < 0.3:
                out += h2_frame(4, 1, 0, b"x")  # ACK with a payload
            out += h2_frame(1, 4, sid, hdr) + h2_frame(0, 1, sid, grpc_message(body))
        elif s == "window":
            out += h2_frame(1, 4, sid, hdr)
            for _ in range(rng.randint(1, 3)):
                out += h2_frame(8, 0, rng.choice([0, sid]), struct.pack(">I", rng.choice([0, 1, 0x7FFFFFFF])))
            out += h2_frame(0, 1, sid, grpc_message(body))
        elif s == "continuation":
            out += h2_frame(1, 0, sid, hdr)
            for i in range(rng.choice([10, 1000, 5000])):
                out += h2_frame(9, 0, sid, hpack_lit(f"x-pad-{i}", "v" * 20))
            out += h2_frame(9, 4, sid, b"")
        elif s == "bad-hpack":
            out += h2_frame(1, 5, sid, rng.choice([rng.randbytes(rng.randint(1, 200)), b"\xff" * 10, b"\x3f\xe1\x1f",
                                                   b"\x00\x7f\xff\xff\xff\x7f"]))
        elif s == "bad-stream-ids":
            bad = rng.choice([0, 2, sid + 100, sid])  # stream 0, an even id, a jump, a reuse
            out += h2_frame(1, 4, bad, hdr) + h2_frame(0, 1, rng.choice([bad, sid + 2]), grpc_message(body))
            out += h2_frame(0, 1, 99, b"data on a stream never opened")
        elif s == "random-frames":
            for _ in range(rng.randint(1, 20)):
                out += h2_frame(rng.randint(0, 12), rng.getrandbits(8), rng.choice([0, 1, sid, rng.getrandbits(31)]),
                                rng.randbytes(rng.choice([0, 1, 4, 8, 64])))
        elif s == "half-frame":
            out += h2_frame(1, 4, sid, hdr) + struct.pack(">I", 16384)[1:] + b"\x00\x00" + struct.pack(">I", sid) + b"part"
            parts.append("(stops)")
            sid += 2
            break
        elif s == "headers-only":
            for _ in range(rng.choice([10, 300])):
                out += h2_frame(1, 4, sid, hdr)
                sid += 2
        elif s == "client-trailers":
            out += h2_frame(1, 4, sid, hdr) + h2_frame(0, 0, sid, grpc_message(body)) + \
                h2_frame(1, 5, sid, hpack_lit("grpc-status", "0"))
        elif s == "bad-headers":
            variant = rng.choice(["no-te", "json", "get", "no-path", "no-method", "upper", "grpc-timeout"])
            if variant == "no-te":
                h = h2_request_headers(path, drop=("te",))
            elif variant == "json":
                h = h2_request_headers(path, drop=("content-type",), extra=[("content-type", "application/json")])
            elif variant == "get":
                h = h2_request_headers(path, drop=(":method",), extra=[(":method", "GET")])
            elif variant == "no-path":
                h = h2_request_headers(path, drop=(":path",))
            elif variant == "no-method":
                h = h2_request_headers(path, drop=(":method",))
            elif variant == "upper":
                h = h2_request_headers(path, extra=[("X-Upper", "1")])
            else:
                h = h2_request_headers(path, extra=[("grpc-timeout", rng.choice(["0n", "1n", "99999999H", "-1S",
                                                                                  "1x", "", "100000000S"]))])
            out += h2_frame(1, 4, sid, h) + h2_frame(0, 1, sid, grpc_message(body))
        sid += 2
    if rng.random() < 0.2:
        out += h2_frame(7, 0, 0, struct.pack(">II", sid, rng.choice([0, 1, 2, 0xFF])))  # GOAWAY
    if rng.random() < 0.05:
        out = bytearray(rng.randbytes(rng.randint(1, 100))) + out  # no valid preface at all
        parts.insert(0, "garbage-first")
        expect = {}
    return Case("h2raw", [h2raw(bytes(out), rng.choice([0.05, 0.2, 0.5]), "+".join(parts), expect)],
                tag="+".join(parts))


GENERATORS = [g_compress, g_decompress, g_encrypt, g_decrypt, g_decrypt, g_digest, g_chain, g_chain, g_describe,
              g_health, g_submit, g_compress_stream, g_decompress_stream, g_many_streams, g_auth, g_deadline,
              g_raw_unary, g_raw_unary, g_raw_stream, g_reflection, g_limits, g_h2raw]


# ======================================================================================
# Targets

class Proc:
    """One child process with its output pumped into a log file."""

    def __init__(self, name, argv, log_path, ready_re):
        self.name, self.argv, self.log_path = name, argv, log_path
        logf = open(log_path, "wb", buffering=0)
        logf.write(("$ " + " ".join(argv) + "\n").encode())
        env = dict(os.environ)
        # A symbolicated Swift backtrace takes seconds, during which the dying process
        # holds its connections (calls look hung). The fatal message is printed either way.
        env.setdefault("SWIFT_BACKTRACE", "enable=no")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
        found, self.match = threading.Event(), None

        def pump(proc=self.proc):
            for line in iter(proc.stdout.readline, b""):
                logf.write(line)
                if self.match is None:
                    m = re.search(ready_re, line)
                    if m:
                        self.match = m
                        found.set()
            found.set()
            logf.close()

        self.pump = threading.Thread(target=pump, daemon=True)
        self.pump.start()
        if not found.wait(30) or self.match is None:
            self.kill()
            raise RuntimeError(f"{name} did not start:\n{self.log_tail()}")
        self.started = time.monotonic()

    def alive(self):
        return self.proc.poll() is None

    def describe_exit(self):
        rc = self.proc.poll()
        if rc is None:
            return f"{self.name} running"
        return f"{self.name} killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"{self.name} exit status {rc}"

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, grace=20):
        if self.proc.poll() is not None:
            return None
        time.sleep(max(0.0, self.started + 0.3 - time.monotonic()))  # handlers go in just after the ready line
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return f"{self.name} did not exit within {grace} s of SIGTERM"
        self.pump.join(2)
        return None if rc == 0 else f"{self.describe_exit()} after SIGTERM"

    def log_tail(self, n=30):
        try:
            lines = open(self.log_path, "rb").read().decode(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def crash_report(self, n=12):
        """The fatal lines of a crashed process and what follows them (the stack), if any."""
        try:
            lines = open(self.log_path, "rb").read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        for i, line in enumerate(lines):
            if FATAL_RE.search(line):
                return "\n".join(lines[i:i + n])
        return ""


FATAL_RE = re.compile(r"Fatal error|fatal error|Precondition failed|Assertion failed|Program crashed|"
                      r"Segmentation fault|SIGSEGV|SIGABRT|SIGILL|AddressSanitizer|panic:")


class Target:
    name = "?"

    def __init__(self, binary, workdir):
        self.binary = binary
        self.workdir = tempfile.mkdtemp(prefix=f"afz-{self.name}-", dir=workdir)
        self.tenants = os.path.join(self.workdir, "tenants.yaml")
        self.keyring = os.path.join(self.workdir, "keyring.yaml")
        with open(self.tenants, "w") as f:
            f.write(tenants_yaml())
        with open(self.keyring, "w") as f:
            f.write(keyring_yaml())
        self.procs = []
        self.starts = 0
        self.port = None
        self._channels = []
        self._honest = None

    def serve_argv(self, extra):
        return [self.binary, "serve", "--host", "127.0.0.1", "--port", "0", "--no-metrics", "--tenants", self.tenants,
                "--keyring", self.keyring, "--default-deadline-ms", str(DEFAULT_DEADLINE_MS), "--drain-grace-ms", "2000",
                "--queues", "2", *extra]

    def start_gateway(self, extra):
        g = Proc("gateway", self.serve_argv(extra), os.path.join(self.workdir, f"gateway-{self.starts}.log"),
                 rb"accelgate listening on 127\.0\.0\.1:(\d+)")
        self.procs.append(g)
        self.port = int(g.match.group(1))

    def start(self):
        raise NotImplementedError

    def channel(self):
        import grpc
        if not self._channels:
            self._channels.append(grpc.insecure_channel(f"127.0.0.1:{self.port}", options=CHANNEL_OPTIONS))
        return self._channels[0]

    def alive(self):
        return bool(self.procs) and all(p.alive() for p in self.procs)

    def settle_death(self):
        """After an UNAVAILABLE: give a dying process a moment, so its death is charged to
        the case that caused it."""
        end = time.monotonic() + 0.3
        while time.monotonic() < end and self.alive():
            time.sleep(0.02)

    def exit_description(self):
        return "; ".join(p.describe_exit() for p in self.procs if not p.alive()) or "running"

    def log_tail(self, n=30):
        return "\n".join(f"--- {p.name} ---\n{p.log_tail(n)}" for p in self.procs)

    def dead_log_tail(self, n=30):
        dead = [p for p in self.procs if not p.alive()] or self.procs
        return "\n".join(f"--- {p.name} ---\n{p.crash_report(n) or p.log_tail(n)}" for p in dead)

    def close_channels(self):
        for ch in self._channels:
            ch.close()
        self._channels = []
        if self._honest is not None:
            self._honest[0].close()
            self._honest = None

    def stop(self):
        """SIGTERM, gateway first. Returns a problem (a hang, a bad exit) or None."""
        self.close_channels()
        problems = []
        for p in reversed(self.procs):
            if p.alive():
                problem = p.stop()
                if problem:
                    problems.append(problem)
            else:
                p.pump.join(2)
        self.procs = []
        return "; ".join(problems) or None

    def kill(self):
        self.close_channels()
        for p in self.procs:
            p.kill()
            p.pump.join(2)
        self.procs = []

    def restart(self):
        self.kill()
        self.start()

    def honest(self, patient=False):
        """Health SERVING, a zlib Compress round trip and an AES-256-GCM Encrypt, checked
        with zlib and cryptography; admission refusals are retried for 10 s (any failure
        when `patient`: a gateway attaching to its device)."""
        import grpc
        if self._honest is None:
            ch = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=CHANNEL_OPTIONS)
            from accelgate.v1 import accelerator_pb2_grpc
            from agstubs_health import health_pb2_grpc
            self._honest = (ch, accelerator_pb2_grpc.AcceleratorStub(ch), health_pb2_grpc.HealthStub(ch))
        _, stub, health = self._honest
        md = AUTH["honest"]
        end = time.monotonic() + HONEST_S
        last = ""
        while True:
            try:
                h = health.Check(hpb.HealthCheckRequest(), timeout=HONEST_S)
                if h.status != hpb.HealthCheckResponse.SERVING:
                    last = f"health {hpb.HealthCheckResponse.ServingStatus.Name(h.status)}"
                    raise _Retry()
                text = TEXT[:5000]
                r = stub.Compress(pb.CompressRequest(format=2, data=text), metadata=md, timeout=HONEST_S)
                if zlib.decompress(r.data) != text:
                    return False, "Compress returned bytes that zlib does not decode to the input"
                key, nonce = hashlib.sha256(b"honest").digest(), os.urandom(NONCE)
                e = pb.EncryptRequest(algorithm=17, nonce=nonce, aad=b"honest", plaintext=text[:999])
                e.key.raw = key
                r = stub.Encrypt(e, metadata=md, timeout=HONEST_S)
                try:
                    if AESGCM(key).decrypt(nonce, r.ciphertext, b"honest") != text[:999]:
                        return False, "Encrypt: the ciphertext opens to other bytes"
                except InvalidTag:
                    return False, "Encrypt: the ciphertext does not authenticate with cryptography's AES-GCM"
                return True, ""
            except _Retry:
                pass
            except grpc.RpcError as e:
                trailing = dict(e.trailing_metadata() or ())
                last = f"gRPC {e.code().name}: {e.details()}"
                if not (patient or e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry-after-ms" in trailing
                        or e.code() == grpc.StatusCode.DEADLINE_EXCEEDED):
                    return False, last
            if time.monotonic() > end or not self.alive():
                return False, last + f" (for {HONEST_S:.0f} s)"
            time.sleep(0.2)

    def cleanup(self):
        shutil.rmtree(self.workdir, ignore_errors=True)


class _Retry(Exception):
    pass


class EmbeddedTarget(Target):
    name = "embedded"

    def start(self):
        self.starts += 1
        self.procs = []
        self.start_gateway(["--engines", "2"])


class DaemonTarget(Target):
    name = "daemon"

    def start(self):
        self.starts += 1
        self.procs = []
        sock = os.path.join(self.workdir, "dev.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        self.procs.append(Proc("device", [self.binary, "device", "--socket", sock, "--engines", "2"],
                               os.path.join(self.workdir, f"device-{self.starts}.log"),
                               rb"accelgate device listening on "))
        self.start_gateway(["--device", f"unix://{sock}"])


TARGETS = {"embedded": EmbeddedTarget, "daemon": DaemonTarget}


# ======================================================================================
# Findings

class Findings:
    """One reproducer per distinct finding (at most 3 per kind and generator); all counted."""

    def __init__(self, seed, binary):
        self.seed, self.binary = seed, binary
        self.counts = collections.Counter()
        self.unique = {}
        self.files = []
        self.per_kind = collections.Counter()
        self.first = {}

    def add(self, target, kind, detail, cases, signature=None, extra=None, elapsed=None):
        """`cases`: what to replay, in order; the last one is the case the finding is in
        (earlier ones are the batch's context: a state a previous case left behind)."""
        name = cases[-1].name if cases else "-"
        sig = (target, kind, name, signature)
        self.counts[(target, kind)] += 1
        if target not in self.first and elapsed is not None:
            self.first[target] = (elapsed, kind)
        if sig in self.unique:
            self.unique[sig]["occurrences"] += 1
            return None
        entry = {"occurrences": 1, "detail": detail, "file": None}
        self.unique[sig] = entry
        self.per_kind[(target, kind, name)] += 1
        if self.per_kind[(target, kind, name)] > 3:
            return None
        os.makedirs(FINDINGS_DIR, exist_ok=True)
        n = len(self.files) + 1
        path = os.path.join(FINDINGS_DIR, f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{n:03d}-{target}-"
                                          f"{kind}-{re.sub(r'[^a-z0-9_+]+', '_', name)[:40]}.jsonl")
        header = {"finding": kind, "target": target, "detail": detail, "signature": signature, "seed": self.seed,
                  "binary": self.binary, "found_after_s": None if elapsed is None else round(elapsed, 1),
                  "replay": f"python3 fuzz/api/api_fuzz.py --replay {os.path.relpath(path, ROOT)}"}
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


def step_summary(step, n=300):
    if step["op"] == "chain":
        return _short("chain: " + " -> ".join(f"{c['path'].rsplit('/', 1)[-1]} [{c.get('desc', '')[:90]}]"
                                               for c in step["calls"]), n)
    return _short(f"{step['op']} {step.get('path', '')} [{step.get('desc', '')}]", n)


def _short(x, n=300):
    s = str(x)
    return s if len(s) <= n else s[:n] + "..."


def crash_signature(log_tail):
    """The fatal line of a crashed process (digits and addresses folded), if it printed one."""
    for line in log_tail.splitlines():
        if FATAL_RE.search(line):
            return re.sub(r"0x[0-9a-f]+|\d+", "N", line.split(" accelgate: ")[-1].strip())[:160]
    return None


# ======================================================================================
# The campaign for one target

class Campaign:
    def __init__(self, args, target_name, findings, workdir):
        self.args, self.target_name, self.findings, self.workdir = args, target_name, findings, workdir
        self.rng = random.Random(f"{args.seed}:{target_name}")
        self.stats = collections.Counter()
        self.target = None
        self.runner = None
        self.pool = []
        self.t0 = None
        self.crash_sigs = {}
        self.crash_sigs_case = {}

    def log(self, msg):
        if not self.args.quiet:
            print(f"[{self.target_name} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def start(self):
        self.target = TARGETS[self.target_name](self.args.binary, self.workdir)
        self.target.start()
        self.runner = Runner(self.target, self.stats)
        ok, why = self.target.honest(patient=True)
        if not ok:
            raise RuntimeError(f"{self.target_name}: honest client refused right after start: {why}\n"
                               f"{self.target.log_tail()}")

    def restart(self, why):
        self.stats["restarts"] += 1
        self.log(f"restarting: {why}")
        self.target.kill()
        self.target.start()
        self.runner = Runner(self.target, self.stats)
        ok, why2 = self.target.honest(patient=True)
        if not ok:
            raise RuntimeError(f"{self.target_name}: honest client refused after a restart: {why2}")

    def next_case(self):
        if not self.pool:
            self.pool = list(GENERATORS)
            self.rng.shuffle(self.pool)
        gen = self.pool.pop()
        seed = self.rng.getrandbits(64)
        try:
            case = gen(random.Random(seed))
        except Exception:  # a generator bug: report it once, go on with the others
            self.stats["generator_errors"] += 1
            if self.stats["generator_errors"] == 1:
                import traceback
                traceback.print_exc()
            case = Case(gen.__name__[2:], [], tag=f"generator error (seed {seed})")
        self.stats["cases"] += 1
        self.stats["gen:" + case.name] += 1
        return case

    def elapsed(self):
        return time.monotonic() - self.t0

    def record(self, kind, detail, cases, signature=None, extra=None):
        extra = dict(extra or {})
        extra.setdefault("log_tail", self.target.log_tail(15))
        extra["cases_before"] = self.stats["cases"]
        path = self.findings.add(self.target_name, kind, detail, cases, signature, extra, elapsed=self.elapsed())
        self.log(f"FINDING {kind} after {self.elapsed():.1f} s ({self.stats['cases']} cases): {_short(detail, 400)}"
                 + (f"\n    reproducer {os.path.relpath(path, ROOT)}" if path else ""))

    def run(self, deadline, iterations):
        self.t0 = time.monotonic()
        self.start()
        try:
            while (iterations is None or self.stats["cases"] < iterations) and time.monotonic() < deadline:
                n = self.args.batch if iterations is None else min(self.args.batch, iterations - self.stats["cases"])
                batch = []
                crashed = False
                for _ in range(n):
                    if time.monotonic() >= deadline:
                        break
                    batch.append(self.next_case())
                    if not self.run_case(batch):
                        crashed = True
                        break
                if batch and not crashed:
                    self.after_batch(batch)
                self.stats["batches"] += 1
        finally:
            problem = self.target.stop()
            if problem:
                self.record("shutdown", problem, [])
            self.target.cleanup()
        self.stats["seconds"] = round(self.elapsed(), 1)
        return self.stats

    def run_case(self, batch):
        """Runs the last case of the batch; False when the batch ended (a crash)."""
        case = batch[-1]
        issues = self.runner.run(case)
        if not self.target.alive():
            self.on_crash(batch)
            return False
        context = batch[-1 - self.args.context:-1] if self.args.context else []
        for issue in issues:
            self.record(issue.kind, f"{case.name} ({case.tag}): {issue.detail}", context + [case],
                        signature=re.sub(r"\d+", "N", issue.detail)[:100],
                        extra={"context_cases": len(context)} if context else None)
        return True

    def after_batch(self, batch):
        ok, why = self.target.honest()
        self.stats["honest_checks"] += 1
        if not self.target.alive():
            self.on_crash(batch)
            return
        if not ok:
            self.record("honest-refused", f"after a batch of {len(batch)} cases: {why}", batch)
            self.restart("honest client refused")

    # -- crashes -------------------------------------------------------------------------

    def _kills(self, case):
        """Runs `case` alone against a fresh target: does it kill it?"""
        self.target.restart()
        self.target.honest(patient=True)
        self.runner = Runner(self.target, collections.Counter())
        self.stats["isolation_runs"] += 1
        self.runner.run(case)
        end = time.monotonic() + 0.5
        while time.monotonic() < end and self.target.alive():
            time.sleep(0.02)
        return not self.target.alive()

    def on_crash(self, cases):
        how = self.target.exit_description()
        tail = self.target.dead_log_tail(25)
        sig = crash_signature(tail) or how
        self.stats["crashes"] += 1
        elapsed = self.elapsed()
        self.log(f"CRASH after {elapsed:.1f} s ({self.stats['cases']} cases): {how}; {sig}")
        if sig in self.crash_sigs:  # already isolated: count it, do not spend the time again
            self.crash_sigs[sig] += 1
            self.findings.add(self.target_name, "crash", f"{how}: {sig}", [self.crash_sigs_case[sig]],
                              signature=sig, elapsed=elapsed)
            self.restart("crash (known)")
            return
        budget_end = time.monotonic() + self.args.isolate_seconds
        culprit = None
        for case in reversed(cases):  # the killer is most likely the last case run
            if time.monotonic() > budget_end:
                break
            if self._kills(case):
                culprit = case
                break
        killer = None
        if culprit is not None:
            killer = self.minimize(culprit, budget_end)
        extra = {"crash_log_tail": tail, "isolated": culprit is not None}
        if killer is not None:
            k = killer.steps[0]
            extra["killer_request"] = {key: k.get(key) for key in ("op", "path", "desc", "auth", "req", "msgs", "calls")
                                       if k.get(key) is not None}
        recorded = [killer or culprit] if culprit is not None else cases
        self.crash_sigs[sig] = 1
        self.crash_sigs_case[sig] = recorded[0]
        if not self.stats["first_crash_s"]:
            self.stats["first_crash_s"] = round(elapsed, 1)
            self.stats["first_crash_cases"] = self.stats["cases"]
        self.findings.first.setdefault(self.target_name, (elapsed, "crash"))
        path = self.findings.add(self.target_name, "crash", f"{how}: {sig}", recorded, signature=sig,
                                 extra=dict(extra, cases_before=self.stats["cases"],
                                            time_to_find_s=round(elapsed, 1)), elapsed=elapsed)
        self.log(f"FINDING crash: {how}: {sig}" + (f"\n    killer: {step_summary(killer.steps[0])}" if killer else "") +
                 (f"\n    reproducer {os.path.relpath(path, ROOT)}" if path else ""))
        self.restart("crash")

    def minimize(self, case, budget_end):
        """The smallest single step of `case` (a call, or a Submit of one job) that still
        kills a fresh target."""
        units = list(units_of(case.steps))
        best = Case(case.name, case.steps, case.tag)
        killed_by_best = True  # the last _kills run (on_crash's) was `case` itself
        together = len(case.steps) == 1 and case.steps[0]["op"] == "parallel"

        def as_case(group):
            steps = [group[0]] if len(group) == 1 else ([parallel(group)] if together else group)
            return Case(case.name, steps, case.tag + (" (minimized)" if len(group) == 1 else
                                                      f" ({len(group)} of {len(units)} steps)"))

        cur = units
        while len(cur) > 1 and time.monotonic() < budget_end:  # bisect: keep a half that still kills
            half = len(cur) // 2
            for part in (cur[half:], cur[:half]):  # the later steps first: the killer is often last
                if time.monotonic() > budget_end:
                    break
                if self._kills(as_case(part)):
                    cur, killed_by_best = part, True
                    break
                killed_by_best = False
            else:
                break  # neither half alone: the steps kill together
            best = as_case(cur)
            if time.monotonic() > budget_end:
                break
        s = best.steps[0]
        if len(best.steps) == 1 and s["op"] == "chain" and time.monotonic() < budget_end:
            # the call in flight when the process died, its linked fields filled in
            if killed_by_best or self._kills(best):
                step, req = self.runner.sent[-1] if self.runner.sent else (None, None)
                if step is not None:
                    u = dict(step, req=b64e(req))
                    msg = parse(request_class(step["path"]), req)
                    if msg is not None:
                        u["desc"] = describe_msg(msg)
                    one = Case(case.name, [u], case.tag + " (the chain's deadly call, materialized)")
                    if time.monotonic() < budget_end and self._kills(one):
                        return one
            return best
        if s["op"] == "stream" and len(s["msgs"]) > 1:
            for i in range(len(s["msgs"])):
                if time.monotonic() > budget_end:
                    break
                t = dict(s, msgs=[s["msgs"][i]], mode="close")
                t.pop("cut", None)
                if isinstance(t.get("valid"), list):
                    t["valid"] = [s["valid"][i]]
                try:
                    t["desc"] = describe_msg(parse(request_class(s["path"]), b64d(s["msgs"][i])), 300)
                except Exception:
                    pass
                one = Case(case.name, [t], case.tag + f" (message {i} alone)")
                if self._kills(one):
                    return one
        return best


# ======================================================================================
# Replay

def replay(args):
    lines = [json.loads(l) for l in open(args.replay) if l.strip()]
    header = lines[0] if "finding" in lines[0] else {}
    target_names = [header["target"]] if header.get("target") in TARGETS and args.target == "both" else (
        ["embedded", "daemon"] if args.target == "both" else [args.target])
    cases = collections.OrderedDict()
    for l in lines:
        if "name" in l and "case" in l:
            cases[l["case"]] = Case(l["name"], [], l.get("tag", ""))
        elif "step" in l:
            cases[l["case"]].steps.append(l["step"])
    if header:
        print(f"recorded: {header['finding']} on {header.get('target')}: {_short(header['detail'], 400)}")
    reproduced = False
    workdir = tempfile.mkdtemp(prefix="afz-replay-", dir="/tmp")
    try:
        for tname in target_names:
            target = TARGETS[tname](args.binary, workdir)
            target.start()
            print(f"replaying {len(cases)} case(s) against a fresh {tname} target, {args.repeat} time(s)")
            stats = collections.Counter()
            runner = Runner(target, stats)
            issues = []
            try:
                for _ in range(args.repeat):
                    for case in cases.values():
                        issues += runner.run(case)
                        if not target.alive():
                            break
                    if not target.alive():
                        break
                time.sleep(0.3)
                if not target.alive():
                    print(f"CRASH ({tname}): {target.exit_description()}\n{target.dead_log_tail(25)}")
                    reproduced = True
                else:
                    ok, why = target.honest()
                    print(f"honest client ({tname}): {'served' if ok else 'REFUSED: ' + why}")
                    reproduced = reproduced or not ok
                for i in issues:
                    print(f"{i.kind.upper()} ({tname}): {_short(i.detail, 500)}")
                    reproduced = True
                st = {k[7:]: v for k, v in stats.items() if k.startswith("status:")}
                print(f"statuses ({tname}): {dict(sorted(st.items()))}")
            finally:
                target.stop() if target.alive() else target.kill()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("reproduced" if reproduced else "not reproduced")
    return 1 if reproduced else 0


# ======================================================================================

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=["embedded", "daemon", "both"], default="both")
    p.add_argument("--seed", type=int, default=None, help="RNG seed (default: $SEED, else random; printed)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--iterations", type=int, help="cases per target")
    g.add_argument("--seconds", type=float, help="wall time per target (default 45)")
    p.add_argument("--binary", default=os.environ.get("ACCELGATE_BIN") or DEFAULT_BINARY,
                   help="accelgate binary (default $ACCELGATE_BIN or .build/debug/accelgate)")
    p.add_argument("--batch", type=int, default=None, help="cases between honest-client checks (default: one round "
                                                        "of the generators)")
    p.add_argument("--isolate-seconds", type=float, default=20.0, help="time to isolate and minimize a crash")
    p.add_argument("--context", type=int, default=6, help="cases before a (non-crash) finding's case written into "
                                                          "its reproducer, replayed first")
    p.add_argument("--replay", metavar="FILE", help="replay a reproducer (JSON lines) against a fresh target")
    p.add_argument("--repeat", type=int, default=1, help="--replay: runs of the recorded cases")
    p.add_argument("--only", metavar="GEN[,GEN]", help="run only these generators (e.g. decrypt,chain)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if not os.access(args.binary, os.X_OK):
        sys.exit(f"{args.binary} is missing or not executable (build it, or pass --binary / set ACCELGATE_BIN)")
    load_stubs()
    if args.only:
        names = set(args.only.split(","))
        GENERATORS[:] = [g for g in GENERATORS if g.__name__[2:] in names]
        if not GENERATORS:
            sys.exit(f"--only: no generator named {args.only}")
    if args.batch is None:
        args.batch = max(len(GENERATORS), 8)
    if args.replay:
        sys.exit(replay(args))
    if args.seed is None:
        env = os.environ.get("SEED")
        args.seed = int(env) if env else random.SystemRandom().randrange(1 << 32)
    targets = ["embedded", "daemon"] if args.target == "both" else [args.target]
    seconds = args.seconds if args.seconds is not None else (None if args.iterations else 45.0)
    findings = Findings(args.seed, args.binary)
    workdir = tempfile.mkdtemp(prefix="afz-", dir="/tmp")  # short: the daemon's socket path is limited to 108 bytes
    print(f"api_fuzz: seed {args.seed}, targets {targets}, "
          f"{f'{seconds:.0f} s' if seconds else f'{args.iterations} cases'} each, binary {args.binary}", flush=True)
    threading.Thread(target=bombs, daemon=True).start()
    results = {}
    t0 = time.monotonic()
    try:
        for name in targets:
            camp = Campaign(args, name, findings, workdir)
            deadline = time.monotonic() + seconds if seconds else float("inf")
            results[name] = camp.run(deadline, None if seconds else args.iterations)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n==== api_fuzz summary (seed {args.seed}, {time.monotonic() - t0:.1f} s) ====")
    keys = ["seconds", "cases", "batches", "calls", "submit_jobs", "checked", "chains_complete", "h2_connections",
            "honest_checks", "restarts", "crashes", "isolation_runs", "valid_rejected_admission", "lenient_accepts",
            "cardinality_refusals", "client_errors", "runner_errors", "generator_errors"]
    for name, st in results.items():
        print(f"{name}: " + ", ".join(f"{k}={st.get(k, 0)}" for k in keys))
        print(f"  statuses: {dict(sorted((k[7:], v) for k, v in st.items() if k.startswith('status:')))}")
        by_method = collections.defaultdict(dict)
        for k, v in st.items():
            if k.startswith("method:"):
                _, m, code = k.split(":", 2)
                by_method[m][code] = v
        print("  by method: " + "; ".join(f"{m} " + ",".join(f"{c}={n}" for c, n in sorted(codes.items()))
                                          for m, codes in sorted(by_method.items())))
        msgs = sorted(((v, k[4:]) for k, v in st.items() if k.startswith("msg:")), reverse=True)
        if msgs:
            print("  UNAVAILABLE/INTERNAL/UNKNOWN messages: " + "; ".join(f"{k} x{v}" for v, k in msgs[:8]))
        jobs = {k[4:]: v for k, v in st.items() if k.startswith("job:")}
        if jobs:
            print(f"  Submit job codes: {dict(sorted(jobs.items()))}")
        gens = {k[4:]: v for k, v in st.items() if k.startswith("gen:")}
        print(f"  cases per generator: {dict(sorted(gens.items()))}")
        if name in findings.first:
            el, kind = findings.first[name]
            print(f"  first finding ({kind}) after {el:.1f} s")
        if st.get("first_crash_s"):
            print(f"  first crash after {st['first_crash_s']} s ({st['first_crash_cases']} cases)")
    if findings.counts:
        print("findings (occurrences; distinct):")
        for (tname, kind), n in sorted(findings.counts.items()):
            distinct = [(sig, e) for sig, e in findings.unique.items() if sig[0] == tname and sig[1] == kind]
            print(f"  {tname} {kind}: {n} occurrence(s), {len(distinct)} distinct")
            for sig, e in distinct:
                where = os.path.relpath(e["file"], ROOT) if e["file"] else "(not written: enough of this kind)"
                print(f"    - [{sig[2]}] x{e['occurrences']}: {_short(e['detail'], 260)}\n      {where}")
        return 1
    print("no findings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
