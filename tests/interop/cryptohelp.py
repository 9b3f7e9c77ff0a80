"""Helpers for the crypto interop tests: algorithm tables, Python reference
implementations, NIST response-file parsing, the Submit stream, keyring files,
SIGHUP reloads and key-material scans.

Imported by test_crypto_nist.py, test_crypto_crosscheck.py and test_keyring.py.
"""
import base64
import concurrent.futures as cf
import json
import os
import re
import signal
import struct
import time

import grpc
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from agtest import CALL_TIMEOUT_S, call, pb

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND

AUTH_FAILED = "authentication failed"

NONCE_LEN = 12
TAG_LEN = 16
MAX_AAD = 64 * 1024

AES128 = pb.CIPHER_ALGORITHM_AES_128_GCM
AES256 = pb.CIPHER_ALGORITHM_AES_256_GCM
CHACHA = pb.CIPHER_ALGORITHM_CHACHA20_POLY1305
CIPHERS = {"aes-128-gcm": AES128, "aes-256-gcm": AES256, "chacha20-poly1305": CHACHA}
CIPHER_NAMES = {v: k for k, v in CIPHERS.items()}
KEY_LEN = {AES128: 16, AES256: 32, CHACHA: 32}

SHA256 = pb.DIGEST_ALGORITHM_SHA256
SHA384 = pb.DIGEST_ALGORITHM_SHA384
SHA512 = pb.DIGEST_ALGORITHM_SHA512
HMAC_SHA256 = pb.DIGEST_ALGORITHM_HMAC_SHA256
HMAC_SHA512 = pb.DIGEST_ALGORITHM_HMAC_SHA512
CRC32C = pb.DIGEST_ALGORITHM_CRC32C
CRC32 = pb.DIGEST_ALGORITHM_CRC32
ADLER32 = pb.DIGEST_ALGORITHM_ADLER32
HASH_NAMES = {SHA256: "sha256", SHA384: "sha384", SHA512: "sha512", HMAC_SHA256: "sha256", HMAC_SHA512: "sha512"}


def code_of(value: int) -> grpc.StatusCode:
    """grpc.StatusCode for the integer code a SubmitResponse carries."""
    for c in grpc.StatusCode:
        if c.value[0] == value:
            return c
    raise AssertionError(f"{value} is not a gRPC status code")


def py_aead(alg: int, key: bytes):
    return ChaCha20Poly1305(key) if alg == CHACHA else AESGCM(key)


# ----------------------------------------------------------------------------------------
# CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): two independent references.

CRC32C_POLY = 0x82F63B78


def crc32c_bitwise(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (CRC32C_POLY if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (CRC32C_POLY if c & 1 else 0)
        table.append(c)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c_table(data: bytes, crc: int = 0) -> int:
    t = _CRC32C_TABLE
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ----------------------------------------------------------------------------------------
# NIST CAVP response files


def parse_rsp(path: str):
    """Parses a CAVP .rsp file from cryptography_vectors into a list of dicts. Each
    record starts at a `Count` or `Len` line and carries its `[section]` values under
    `_section`; a bare `FAIL` line sets `FAIL`."""
    import cryptography_vectors
    section, records, cur = {}, [], None
    with cryptography_vectors.open_vector_file(path, "r") as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("[") and line.endswith("]"):
                k, _, v = line[1:-1].partition("=")
                section[k.strip()] = v.strip()
                continue
            if line == "FAIL":
                cur["FAIL"] = True
                continue
            k, sep, v = line.partition("=")
            assert sep, f"{path}: cannot parse line {line!r}"
            k, v = k.strip(), v.strip()
            if k in ("Count", "Len") and (cur is None or k in cur):
                cur = {"_section": dict(section)}
                records.append(cur)
            cur[k] = v
    return records


def unhex(s: str) -> bytes:
    return bytes.fromhex(s or "")


# ----------------------------------------------------------------------------------------
# Submit stream


def submit_all(stub, jobs, *, timeout: float = 300.0, metadata=None):
    """Sends `jobs` (a list of (id, kind, request), kind in encrypt|decrypt|digest|...)
    on one Submit stream and returns {id: SubmitResponse}. Ids must be unique; every
    id must be answered exactly once."""
    ids = [j[0] for j in jobs]
    assert len(set(ids)) == len(ids), "submit_all needs unique ids"

    def requests():
        for job_id, kind, req in jobs:
            yield pb.SubmitRequest(id=job_id, **{kind: req})

    out = {}
    for r in stub.Submit(requests(), timeout=timeout, metadata=metadata):
        assert r.id in ids, f"Submit answered an id that was never sent: {r.id!r}"
        assert r.id not in out, f"Submit answered id {r.id!r} twice"
        out[r.id] = r
    missing = set(ids) - set(out)
    assert not missing, f"Submit stream ended without answering {len(missing)} jobs, e.g. {sorted(missing)[:5]}"
    return out


def parallel(fn, items, workers: int = 4):
    """Runs fn(item) for every item on a thread pool; returns the results in order."""
    with cf.ThreadPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(fn, items))


# ----------------------------------------------------------------------------------------
# Crypto calls


def encrypt(stub, *, alg=0, key=None, name=None, nonce=b"", aad=b"", plaintext=b"", compress=None,
            timeout=CALL_TIMEOUT_S, metadata=None):
    spec = pb.KeySpec(raw=key) if key is not None else pb.KeySpec(name=name) if name is not None else None
    req = pb.EncryptRequest(algorithm=alg, nonce=nonce, aad=aad, plaintext=plaintext)
    if spec is not None:
        req.key.CopyFrom(spec)
    if compress is not None:
        req.compress.CopyFrom(compress)
    return call(stub.Encrypt, req, timeout=timeout, metadata=metadata)


def decrypt(stub, *, alg=0, key=None, name=None, nonce=b"", aad=b"", ciphertext=b"", decompress=None,
            max_output_bytes=0, timeout=CALL_TIMEOUT_S, metadata=None):
    spec = pb.KeySpec(raw=key) if key is not None else pb.KeySpec(name=name) if name is not None else None
    req = pb.DecryptRequest(algorithm=alg, nonce=nonce, aad=aad, ciphertext=ciphertext,
                            max_output_bytes=max_output_bytes)
    if spec is not None:
        req.key.CopyFrom(spec)
    if decompress is not None:
        req.decompress.CopyFrom(decompress)
    return call(stub.Decrypt, req, timeout=timeout, metadata=metadata)


def digest(stub, alg, data, *, key=None, name=None, timeout=CALL_TIMEOUT_S, metadata=None):
    req = pb.DigestRequest(algorithm=alg, data=data)
    if key is not None:
        req.key.raw = key
    elif name is not None:
        req.key.name = name
    return call(stub.Digest, req, timeout=timeout, metadata=metadata)


def expect_code(outcome, code, *, contains: str = "", what: str = ""):
    """The call failed (or succeeded) with exactly `code`; for failures the message
    is non-empty and contains `contains` (case-insensitive)."""
    where = f" for {what}" if what else ""
    assert outcome.code == code, f"expected {code.name}{where}, got {outcome.describe()}"
    if code != OK:
        assert outcome.details.strip(), f"{code.name}{where} carries no message"
        assert contains.lower() in outcome.details.lower(), \
            f"{code.name}{where}: message {outcome.details!r} lacks {contains!r}"


def crypto_round_trip(stub, what: str = "", metadata=None):
    """A raw-key AES-256-GCM encrypt + decrypt must work right now."""
    key, nonce, pt = os.urandom(32), os.urandom(12), b"still serving? " * 10
    e = encrypt(stub, alg=AES256, key=key, nonce=nonce, aad=b"rt", plaintext=pt, metadata=metadata)
    assert e.ok, f"server stopped serving crypto{(' after ' + what) if what else ''}: Encrypt -> {e.describe()}"
    assert AESGCM(key).decrypt(nonce, e.response.ciphertext, b"rt") == pt
    d = decrypt(stub, alg=AES256, key=key, nonce=nonce, aad=b"rt", ciphertext=e.response.ciphertext,
                metadata=metadata)
    assert d.ok and d.response.plaintext == pt, \
        f"server stopped serving crypto{(' after ' + what) if what else ''}: Decrypt -> {d.describe()}"


# ----------------------------------------------------------------------------------------
# Envelopes (named keys)

ENVELOPE_MARKER = 0xA6
ENVELOPE_FORMAT = 1
ENVELOPE_HEADER = 6
ENVELOPE_OVERHEAD = ENVELOPE_HEADER + NONCE_LEN


def envelope_header(version: int) -> bytes:
    return bytes([ENVELOPE_MARKER, ENVELOPE_FORMAT]) + struct.pack(">I", version)


def open_envelope(alg: int, key: bytes, envelope: bytes, aad: bytes = b"") -> bytes:
    """Opens a named-key envelope independently of the service (docs/KEYS.md)."""
    assert len(envelope) >= ENVELOPE_OVERHEAD + TAG_LEN, f"envelope of {len(envelope)} bytes is too short"
    header, nonce, body = envelope[:6], envelope[6:18], envelope[18:]
    return py_aead(alg, key).decrypt(nonce, body, header + aad)


def seal_envelope(alg: int, key: bytes, version: int, plaintext: bytes, aad: bytes = b"", nonce: bytes = None):
    """Builds an envelope in Python, as the service would."""
    nonce = nonce if nonce is not None else os.urandom(NONCE_LEN)
    header = envelope_header(version)
    return header + nonce + py_aead(alg, key).encrypt(nonce, plaintext, header + aad)


def envelope_version(envelope: bytes) -> int:
    return struct.unpack(">I", envelope[2:6])[0]


# ----------------------------------------------------------------------------------------
# Keyring files


class KeyVersion:
    def __init__(self, version: int, key: bytes, disabled: bool = None):
        self.version, self.key, self.disabled = version, key, disabled


class NamedKey:
    """One keyring entry. `versions` is a list of KeyVersion."""

    def __init__(self, name, algorithm, versions, tenant="default", min_decryption_version=None,
                 max_encryptions=None):
        self.name, self.algorithm, self.versions, self.tenant = name, algorithm, list(versions), tenant
        self.min_decryption_version, self.max_encryptions = min_decryption_version, max_encryptions

    def key(self, version: int) -> bytes:
        for v in self.versions:
            if v.version == version:
                return v.key
        raise KeyError(version)


def new_key_bytes(algorithm: str, length: int = None) -> bytes:
    if length is None:
        length = 16 if algorithm == "aes-128-gcm" else 32
    return os.urandom(length)


def keyring_yaml(keys) -> str:
    lines = ["keys:"]
    for k in keys:
        lines += [f"  - name: {k.name}", f"    tenant: {k.tenant}", f"    algorithm: {k.algorithm}"]
        if k.min_decryption_version is not None:
            lines.append(f"    min_decryption_version: {k.min_decryption_version}")
        if k.max_encryptions is not None:
            lines.append(f"    max_encryptions: {k.max_encryptions}")
        lines.append("    versions:")
        for v in k.versions:
            entry = f'version: {v.version}, key: "{base64.b64encode(v.key).decode()}"'
            if v.disabled is not None:
                entry += f", disabled: {'true' if v.disabled else 'false'}"
            lines.append(f"      - {{ {entry} }}")
    return "\n".join(lines) + "\n"


def write_keyring(path: str, keys=None, *, text: str = None) -> str:
    """Writes a keyring atomically (a reload never sees half a file); returns path."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text if text is not None else keyring_yaml(keys))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------
# Logs, reloads, key-material scans


def log_bytes(srv) -> bytes:
    """Everything the server has logged so far. Reads through the test process's own
    open log file when it can (/proc/self/fd), so a second pytest session started
    meanwhile (whose conftest clears and reuses the log folder) cannot swap or delete
    the file under us; falls back to the path."""
    handle = getattr(srv, "_log", None)
    if handle is not None and not handle.closed and os.path.isdir("/proc/self/fd"):
        try:
            with open(f"/proc/self/fd/{handle.fileno()}", "rb") as f:
                return f.read()
        except OSError:
            pass
    with open(srv.log_path, "rb") as f:
        return f.read()


def log_text(srv) -> str:
    return log_bytes(srv).decode(errors="replace")


def _reload_lines(srv):
    return [line for line in log_text(srv).splitlines() if re.search(r"reload", line, re.I)]


def reload_and_wait(srv, *, ok: bool = True, within_s: float = 15.0) -> str:
    """Sends SIGHUP (which reloads tenants and keyring) and waits for the server's log
    line about the reload; fails if none appears or it reports the other outcome."""
    before = len(_reload_lines(srv))
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        lines = _reload_lines(srv)
        if len(lines) > before:
            line = lines[before]
            failed = bool(re.search(r"fail|error", line, re.I))
            assert failed != ok, f"expected a {'successful' if ok else 'failed'} reload, the server logged: {line}"
            return line
        assert srv.alive(), f"server died on SIGHUP\n{srv.log_tail()}"
        time.sleep(0.02)
    raise AssertionError(f"no reload line in the server log within {within_s} s of SIGHUP\n{srv.log_tail()}")


def key_encodings(key: bytes):
    """Textual forms in which a key could leak into a log."""
    b64 = base64.b64encode(key).decode()
    forms = {
        "base64": b64,
        "base64 unpadded": b64.rstrip("="),
        "base64url": base64.urlsafe_b64encode(key).decode().rstrip("="),
        "hex": key.hex(),
        "HEX": key.hex().upper(),
        "hex with spaces": " ".join(f"{b:02x}" for b in key),
    }
    return forms


def assert_no_key_material(data: bytes, keys, where: str):
    """None of `keys` appears in `data` (raw, base64, hex ...). `keys` is {label: bytes}."""
    text = data.decode(errors="replace")
    for label, key in keys.items():
        assert len(key) >= 8, f"key {label} is too short to scan for"
        if key in data:
            raise AssertionError(f"raw bytes of key {label} appear in {where}")
        for form, s in key_encodings(key).items():
            # Short prefixes could match by chance; the full encodings cannot.
            if s in text:
                i = text.index(s)
                raise AssertionError(f"{form} of key {label} appears in {where}: "
                                     f"...{text[max(0, i - 120):i + len(s) + 40]}...")


def read_audit(path: str):
    """The audit log as a list of dicts; every line must be a JSON object."""
    if not os.path.exists(path):
        return []
    entries = []
    with open(path, "rb") as f:
        for n, line in enumerate(f.read().decode().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as e:
                raise AssertionError(f"audit log line {n} is not JSON ({e}): {line!r}")
            assert isinstance(entry, dict), f"audit log line {n} is not an object: {line!r}"
            entries.append(entry)
    return entries


def audit_matches(entry, **want) -> bool:
    return all(str(entry.get(k)) == str(v) for k, v in want.items())


def wait_audit(path: str, within_s: float = 10.0, **want):
    """Waits for an audit entry with the given fields (values compared as strings)."""
    deadline = time.monotonic() + within_s
    while True:
        entries = read_audit(path)
        hits = [e for e in entries if audit_matches(e, **want)]
        if hits:
            return hits
        if time.monotonic() > deadline:
            raise AssertionError(f"no audit entry with {want} within {within_s} s; the log has:\n"
                                 + "\n".join(json.dumps(e, sort_keys=True) for e in entries[-20:]))
        time.sleep(0.05)
