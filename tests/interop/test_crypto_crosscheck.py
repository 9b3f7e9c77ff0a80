"""Crypto cross-checks against Python's own implementations (the `cryptography`
package, hashlib, hmac, zlib, gzip), on the session server with default limits
(4 MiB requests and decompressed output).

* AEAD both ways for AES-128-GCM, AES-256-GCM and ChaCha20-Poly1305: payloads of
  deterministic random sizes from 0 to 3 MiB, with and without AAD.
* Service-drawn nonces.
* Digests and checksums (CRC-32C against two Python references).
* Chains: compress+encrypt and decrypt+decompress in one device job.
* Bad input: exact status codes, both as unary calls and on a Submit stream, and
  the server keeps serving.
"""
import gzip
import hashlib
import hmac
import os
import random
import zlib

import grpc
import pytest
from cryptography.exceptions import InvalidTag

from agtest import (DEFAULT_MAX_DECOMPRESSED, DEFAULT_MAX_REQUEST, DEFLATE, FORMAT_NAMES, GZIP, KiB, MiB, ZLIB,
                    assert_serves, call, pb, py_compress, py_decompress_strict, text_bytes)
from cryptohelp import (ADLER32, AES128, AES256, AUTH_FAILED, CHACHA, CIPHER_NAMES, CRC32, CRC32C, EXHAUSTED,
                        HASH_NAMES, HMAC_SHA256, HMAC_SHA512, INVALID, KEY_LEN, MAX_AAD, NONCE_LEN, PRECONDITION,
                        SHA256, SHA384, SHA512, TAG_LEN, assert_no_key_material, code_of, crc32c_bitwise,
                        crc32c_table, crypto_round_trip, decrypt, digest, encrypt, expect_code, log_bytes, parallel,
                        py_aead, submit_all)

SEED = 20240611
ALGS = [AES128, AES256, CHACHA]
ALG_IDS = [CIPHER_NAMES[a] for a in ALGS]
BIG_TIMEOUT_S = 120

# Keys this module sends; the session server's log must not contain any of them.
_SENT_KEYS = {}


def _remember(label, key):
    if len(key) >= 8:
        _SENT_KEYS[label] = key
    return key


def _sizes(seed):
    """Boundary sizes plus random ones up to 3 MiB, deterministic per seed."""
    rng = random.Random(seed)
    fixed = [0, 1, 15, 16, 17, 255, 4096, 65535, 65536, 65537, MiB, 3 * MiB]
    rnd = [rng.randint(2, 3 * MiB) for _ in range(4)] + [rng.randint(2, 64 * KiB) for _ in range(4)]
    return fixed + rnd


def _cases(alg, seed):
    """(label, key, nonce, aad, plaintext) for every size, with and without AAD."""
    rng = random.Random(seed * 1000 + alg)
    out = []
    for i, n in enumerate(_sizes(seed + alg)):
        for with_aad in (False, True):
            key = rng.randbytes(KEY_LEN[alg])
            nonce = rng.randbytes(NONCE_LEN)
            aad = rng.randbytes(rng.choice([1, 13, 200, 4096, MAX_AAD])) if with_aad else b""
            pt = rng.randbytes(n)
            out.append((f"{CIPHER_NAMES[alg]}-{n}B-{'aad' + str(len(aad)) if aad else 'noaad'}", key, nonce, aad, pt))
    return out


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
def test_service_ciphertexts_open_in_python(stub, alg):
    def one(case):
        label, key, nonce, aad, pt = case
        _remember(label, key)
        o = encrypt(stub, alg=alg, key=key, nonce=nonce, aad=aad, plaintext=pt, timeout=BIG_TIMEOUT_S)
        if not o.ok:
            return f"{label}: Encrypt -> {o.describe()}"
        r = o.response
        if len(r.ciphertext) != len(pt) + TAG_LEN:
            return f"{label}: ciphertext is {len(r.ciphertext)} bytes, want {len(pt) + TAG_LEN}"
        if r.nonce != nonce or r.key_version != 0:
            return f"{label}: nonce/key_version echoed as {r.nonce.hex()}/{r.key_version}"
        try:
            back = py_aead(alg, key).decrypt(nonce, r.ciphertext, aad)
        except InvalidTag:
            return f"{label}: Python cannot authenticate the service's ciphertext"
        if back != pt:
            return f"{label}: Python decrypted something else"
        if r.ciphertext != py_aead(alg, key).encrypt(nonce, pt, aad):
            return f"{label}: ciphertext differs from Python's for the same key/nonce"
        if r.stats.input_bytes != len(pt) or not r.stats.engine:
            return f"{label}: stats input_bytes={r.stats.input_bytes} engine={r.stats.engine!r}"
        return None

    cases = _cases(alg, SEED)
    bad = [b for b in parallel(one, cases, workers=3) if b]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
def test_python_ciphertexts_open_in_service(stub, alg):
    def one(case):
        label, key, nonce, aad, pt = case
        _remember(label, key)
        sealed = py_aead(alg, key).encrypt(nonce, pt, aad)
        o = decrypt(stub, alg=alg, key=key, nonce=nonce, aad=aad, ciphertext=sealed, timeout=BIG_TIMEOUT_S)
        if not o.ok:
            return f"{label}: Decrypt -> {o.describe()}"
        if o.response.plaintext != pt:
            return f"{label}: service plaintext differs ({len(o.response.plaintext)} bytes)"
        if o.response.key_version != 0:
            return f"{label}: key_version {o.response.key_version} for a raw key"
        return None

    cases = _cases(alg, SEED + 1)
    bad = [b for b in parallel(one, cases, workers=3) if b]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
def test_tampering_fails_authentication(stub, alg):
    rng = random.Random(SEED + 2 + alg)
    key, nonce, aad, pt = rng.randbytes(KEY_LEN[alg]), rng.randbytes(12), b"header", rng.randbytes(3000)
    sealed = py_aead(alg, key).encrypt(nonce, pt, aad)
    variants = {
        "flipped tag bit": dict(ciphertext=sealed[:-1] + bytes([sealed[-1] ^ 1])),
        "flipped body bit": dict(ciphertext=bytes([sealed[0] ^ 0x40]) + sealed[1:]),
        "truncated by one": dict(ciphertext=sealed[:-1]),
        "other AAD": dict(aad=b"headeR"),
        "AAD dropped": dict(aad=b""),
        "other nonce": dict(nonce=bytes(12)),
        "other key": dict(key=bytes(KEY_LEN[alg])),
        "tag only": dict(ciphertext=sealed[-TAG_LEN:]),
    }
    if alg != AES128:  # same key length, other algorithm: must not open either
        variants["other algorithm"] = dict(alg=AES256 if alg == CHACHA else CHACHA)
    for what, change in variants.items():
        args = dict(alg=alg, key=key, nonce=nonce, aad=aad, ciphertext=sealed)
        args.update(change)
        o = decrypt(stub, **args)
        expect_code(o, INVALID, what=f"{CIPHER_NAMES[alg]} Decrypt with {what}")
        assert o.details == AUTH_FAILED, f"{what}: message {o.details!r}, want {AUTH_FAILED!r}"
    o = decrypt(stub, alg=alg, key=key, nonce=nonce, aad=aad, ciphertext=sealed)
    assert o.ok and o.response.plaintext == pt, f"the untouched ciphertext must still open: {o.describe()}"


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
def test_service_drawn_nonce(stub, alg):
    key = _remember(f"{CIPHER_NAMES[alg]}-random-nonce", os.urandom(KEY_LEN[alg]))
    pt, aad = os.urandom(1000), b"aad"
    nonces = set()
    for _ in range(8):
        o = encrypt(stub, alg=alg, key=key, aad=aad, plaintext=pt)
        assert o.ok, f"Encrypt with an empty nonce -> {o.describe()}"
        n = o.response.nonce
        assert len(n) == NONCE_LEN, f"service returned a {len(n)}-byte nonce"
        assert py_aead(alg, key).decrypt(n, o.response.ciphertext, aad) == pt
        d = decrypt(stub, alg=alg, key=key, nonce=n, aad=aad, ciphertext=o.response.ciphertext)
        assert d.ok and d.response.plaintext == pt, f"Decrypt with the returned nonce -> {d.describe()}"
        nonces.add(n)
    assert len(nonces) == 8, f"8 encryptions drew only {len(nonces)} distinct nonces"
    assert bytes(12) not in nonces


# ---------------------------------------------------------------------------------------
# Digests


def test_crc32c_references_agree():
    assert crc32c_table(b"123456789") == 0xE3069283
    assert crc32c_bitwise(b"123456789") == 0xE3069283
    assert crc32c_table(b"") == 0 and crc32c_bitwise(b"") == 0
    rng = random.Random(SEED + 3)
    for n in [1, 2, 3, 31, 32, 33, 100, 1000, 4096]:
        data = rng.randbytes(n)
        assert crc32c_table(data) == crc32c_bitwise(data), n
        # Incremental use of the table version agrees with one pass.
        assert crc32c_table(data[n // 2:], crc32c_table(data[:n // 2])) == crc32c_table(data)


def _reference(alg, data, key=None):
    if alg in (SHA256, SHA384, SHA512):
        return hashlib.new(HASH_NAMES[alg], data).digest()
    if alg in (HMAC_SHA256, HMAC_SHA512):
        return hmac.new(key, data, HASH_NAMES[alg]).digest()
    if alg == CRC32:
        return (zlib.crc32(data) & 0xFFFFFFFF).to_bytes(4, "big")
    if alg == ADLER32:
        return (zlib.adler32(data) & 0xFFFFFFFF).to_bytes(4, "big")
    if alg == CRC32C:
        return crc32c_table(data).to_bytes(4, "big")
    raise AssertionError(alg)


DIGEST_NAMES = {SHA256: "sha256", SHA384: "sha384", SHA512: "sha512", CRC32: "crc32", ADLER32: "adler32",
                CRC32C: "crc32c"}


@pytest.mark.parametrize("alg", list(DIGEST_NAMES), ids=list(DIGEST_NAMES.values()))
def test_digests_match_python(stub, alg):
    rng = random.Random(SEED + 4 + alg)
    sizes = [0, 1, 3, 55, 56, 63, 64, 65, 111, 112, 127, 128, 129, 4096, 65536 + 7]
    sizes += [rng.randint(1, 64 * KiB) for _ in range(6)]
    # The pure-Python CRC-32C takes ~0.2 s per MiB; other algorithms go up to 3 MiB.
    sizes += [MiB + 5] if alg == CRC32C else [MiB, 3 * MiB, rng.randint(MiB, 3 * MiB), DEFAULT_MAX_REQUEST]
    payloads = [rng.randbytes(n) for n in sizes] + [b"123456789", bytes(1000), b"\xff" * 333]

    def one(data):
        o = digest(stub, alg, data, timeout=BIG_TIMEOUT_S)
        if not o.ok:
            return f"{len(data)} bytes: Digest -> {o.describe()}"
        want = _reference(alg, data)
        if o.response.digest != want:
            return f"{len(data)} bytes: {o.response.digest.hex()} != {want.hex()}"
        want_sum = int.from_bytes(want, "big") if len(want) == 4 else 0
        if o.response.checksum != want_sum:
            return f"{len(data)} bytes: checksum field {o.response.checksum:#x} != {want_sum:#x}"
        return None

    bad = [b for b in parallel(one, payloads, workers=3) if b]
    assert not bad, "\n".join(bad)


def test_crc32c_known_answer(stub):
    o = digest(stub, CRC32C, b"123456789")
    assert o.ok, o.describe()
    assert o.response.digest == bytes.fromhex("e3069283") and o.response.checksum == 0xE3069283, \
        f"CRC-32C('123456789') = {o.response.digest.hex()} / {o.response.checksum:#x}, want e3069283"
    rng = random.Random(SEED + 5)
    for n in [1, 2, 7, 8, 9, 16, 100, 1000, 3000]:
        data = rng.randbytes(n)
        o = digest(stub, CRC32C, data)
        assert o.ok and o.response.checksum == crc32c_bitwise(data), \
            f"CRC-32C of {n} random bytes: {o.describe()} {o.response.checksum if o.ok else ''}"


@pytest.mark.parametrize("alg", [HMAC_SHA256, HMAC_SHA512], ids=["hmac-sha256", "hmac-sha512"])
def test_hmac_matches_python(stub, alg):
    rng = random.Random(SEED + 6 + alg)
    block = 64 if alg == HMAC_SHA256 else 128
    key_lens = [1, 16, 32, block - 1, block, block + 1, 100, 127, 128, 129, 200, 1000, 5000]
    cases = []
    for kl in key_lens:
        for n in (0, 1, block, 1000, rng.randint(1, 256 * KiB)):
            cases.append((rng.randbytes(kl), rng.randbytes(n)))
    cases.append((rng.randbytes(32), rng.randbytes(3 * MiB)))

    def one(case):
        key, data = case
        if len(key) >= 8:
            _remember(f"hmac-{len(key)}-{len(data)}", key)
        o = digest(stub, alg, data, key=key, timeout=BIG_TIMEOUT_S)
        if not o.ok:
            return f"{len(key)}-byte key, {len(data)} bytes: {o.describe()}"
        want = _reference(alg, data, key)
        if o.response.digest != want:
            return f"{len(key)}-byte key, {len(data)} bytes: {o.response.digest.hex()} != {want.hex()}"
        if o.response.checksum != 0:
            return f"{len(key)}-byte key: checksum field set for an HMAC"
        return None

    bad = [b for b in parallel(one, cases, workers=3) if b]
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------------------
# Chains

CHAIN_FORMATS = [DEFLATE, ZLIB, GZIP]


def _chain_payloads(seed):
    rng = random.Random(seed)
    return [
        ("empty", b""),
        ("text-1k", text_bytes(1000, seed=seed)),
        ("text-700k", text_bytes(700 * KiB, seed=seed + 1)),
        ("text-3m", text_bytes(3 * MiB, seed=seed + 2)),
        ("random-300k", rng.randbytes(300 * KiB)),
        ("zeros-2m", bytes(2 * MiB)),
    ]


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
@pytest.mark.parametrize("fmt", CHAIN_FORMATS, ids=[FORMAT_NAMES[f] for f in CHAIN_FORMATS])
def test_compress_then_encrypt_opens_in_python(stub, alg, fmt):
    rng = random.Random(SEED + 7 + alg * 10 + fmt)

    def one(item):
        (label, pt), level = item
        key, nonce = rng.randbytes(KEY_LEN[alg]), rng.randbytes(12)
        aad = b"chain:" + label.encode()
        chain = pb.ChainedCompression(format=fmt) if level is None else pb.ChainedCompression(format=fmt, level=level)
        o = encrypt(stub, alg=alg, key=key, nonce=nonce, aad=aad, plaintext=pt, compress=chain, timeout=BIG_TIMEOUT_S)
        what = f"{label} level {level}"
        if not o.ok:
            return f"{what}: Encrypt+compress -> {o.describe()}"
        try:
            packed = py_aead(alg, key).decrypt(o.response.nonce, o.response.ciphertext, aad)
        except InvalidTag:
            return f"{what}: Python cannot authenticate the chained ciphertext"
        try:
            back = py_decompress_strict(fmt, packed)
        except (zlib.error, AssertionError) as e:
            return f"{what}: the decrypted bytes are not a valid {FORMAT_NAMES[fmt]} stream: {e}"
        if back != pt:
            return f"{what}: decompressed to other bytes"
        if label.startswith(("text", "zeros")) and level != 0 and len(o.response.ciphertext) > len(pt) // 2:
            return f"{what}: {len(pt)} compressible bytes gave {len(o.response.ciphertext)}; nothing was compressed"
        # And the service opens its own output with the reverse chain.
        d = decrypt(stub, alg=alg, key=key, nonce=o.response.nonce, aad=aad, ciphertext=o.response.ciphertext,
                    decompress=pb.ChainedCompression(format=fmt), timeout=BIG_TIMEOUT_S)
        if not d.ok or d.response.plaintext != pt:
            return f"{what}: Decrypt+decompress of the service's own output -> {d.describe()}"
        return None

    levels = [None, 0, 1, 6, 9]
    items = [(p, levels[i % len(levels)]) for i, p in enumerate(_chain_payloads(SEED + fmt))]
    bad = [b for b in parallel(one, items, workers=2) if b]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
@pytest.mark.parametrize("fmt", CHAIN_FORMATS, ids=[FORMAT_NAMES[f] for f in CHAIN_FORMATS])
def test_python_compressed_encrypted_through_decrypt_decompress(stub, alg, fmt):
    rng = random.Random(SEED + 8 + alg * 10 + fmt)

    def one(item):
        label, pt = item
        key, nonce, aad = rng.randbytes(KEY_LEN[alg]), rng.randbytes(12), rng.randbytes(20)
        packed = gzip.compress(pt, mtime=0) if fmt == GZIP and label.endswith("1k") else py_compress(fmt, pt, 6)
        sealed = py_aead(alg, key).encrypt(nonce, packed, aad)
        o = decrypt(stub, alg=alg, key=key, nonce=nonce, aad=aad, ciphertext=sealed,
                    decompress=pb.ChainedCompression(format=fmt), timeout=BIG_TIMEOUT_S)
        if not o.ok:
            return f"{label}: Decrypt+decompress -> {o.describe()}"
        if o.response.plaintext != pt:
            return f"{label}: got {len(o.response.plaintext)} other bytes"
        return None

    bad = [b for b in parallel(one, _chain_payloads(SEED + 9 + fmt), workers=2) if b]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
def test_chain_failures(stub, alg):
    rng = random.Random(SEED + 10 + alg)
    key, nonce, aad = rng.randbytes(KEY_LEN[alg]), rng.randbytes(12), b"x"
    aead = py_aead(alg, key)
    gz = pb.ChainedCompression(format=GZIP)

    # Wrong tag: nothing is decompressed.
    sealed = aead.encrypt(nonce, py_compress(GZIP, b"payload" * 100), aad)
    o = decrypt(stub, alg=alg, key=key, nonce=nonce, aad=aad, ciphertext=sealed[:-1] + bytes([sealed[-1] ^ 2]),
                decompress=gz)
    expect_code(o, INVALID, what="Decrypt+decompress with a bad tag")
    assert o.details == AUTH_FAILED, o.details

    # Authentic but not gzip.
    o = decrypt(stub, alg=alg, key=key, nonce=nonce, aad=aad, ciphertext=aead.encrypt(nonce, b"not gzip at all", aad),
                decompress=gz)
    expect_code(o, INVALID, contains="corrupt", what="Decrypt+decompress of non-gzip plaintext")

    # Authentic gzip with a broken CRC trailer.
    good = py_compress(GZIP, b"trailer" * 50)
    broken = good[:-8] + bytes([good[-8] ^ 1]) + good[-7:]
    o = decrypt(stub, alg=alg, key=key, nonce=nonce, aad=aad, ciphertext=aead.encrypt(nonce, broken, aad),
                decompress=gz)
    expect_code(o, grpc.StatusCode.DATA_LOSS, what="Decrypt+decompress with a bad gzip CRC")

    # Decompression bomb over the server's limit, and over the caller's max_output_bytes.
    bomb = aead.encrypt(nonce, py_compress(GZIP, bytes(DEFAULT_MAX_DECOMPRESSED + 1), 9), aad)
    o = decrypt(stub, alg=alg, key=key, nonce=nonce, aad=aad, ciphertext=bomb, decompress=gz)
    expect_code(o, EXHAUSTED, what="Decrypt+decompress above the server's decompressed limit")
    small = aead.encrypt(nonce, py_compress(GZIP, bytes(5000)), aad)
    o = decrypt(stub, alg=alg, key=key, nonce=nonce, aad=aad, ciphertext=small, decompress=gz, max_output_bytes=4999)
    expect_code(o, EXHAUSTED, what="Decrypt+decompress above max_output_bytes")
    o = decrypt(stub, alg=alg, key=key, nonce=nonce, aad=aad, ciphertext=small, decompress=gz, max_output_bytes=5000)
    assert o.ok and o.response.plaintext == bytes(5000), f"exactly max_output_bytes must pass: {o.describe()}"

    # Plain decrypt honours max_output_bytes too.
    plain = aead.encrypt(nonce, bytes(100), aad)
    o = decrypt(stub, alg=alg, key=key, nonce=nonce, aad=aad, ciphertext=plain, max_output_bytes=99)
    expect_code(o, EXHAUSTED, what="Decrypt above max_output_bytes")
    o = decrypt(stub, alg=alg, key=key, nonce=nonce, aad=aad, ciphertext=plain, max_output_bytes=100)
    assert o.ok and o.response.plaintext == bytes(100), o.describe()

    # Bad chain settings.
    for chain, contains in [(pb.ChainedCompression(), "format"), (pb.ChainedCompression(format=7), "7"),
                            (pb.ChainedCompression(format=GZIP, level=12), "level")]:
        o = encrypt(stub, alg=alg, key=key, nonce=nonce, plaintext=b"abc", compress=chain)
        expect_code(o, INVALID, contains=contains, what=f"Encrypt with compress={chain}")
    o = decrypt(stub, alg=alg, key=key, nonce=nonce, aad=aad, ciphertext=small, decompress=pb.ChainedCompression())
    expect_code(o, INVALID, contains="format", what="Decrypt with decompress format unset")
    crypto_round_trip(stub, "chain failures")


# ---------------------------------------------------------------------------------------
# Bad input

K16, K32, N12 = os.urandom(16), os.urandom(32), os.urandom(12)
_remember("bad-input K16", K16)
_remember("bad-input K32", K32)
SEALED_AES256 = py_aead(AES256, K32).encrypt(N12, b"hello", b"")


def _enc(**kw):
    kw.setdefault("nonce", N12)
    kw.setdefault("plaintext", b"hello")
    key = kw.pop("key", None)
    req = pb.EncryptRequest(**kw)
    if key is not None:
        req.key.CopyFrom(key)
    return "encrypt", req


def _dec(**kw):
    kw.setdefault("nonce", N12)
    kw.setdefault("ciphertext", SEALED_AES256)
    key = kw.pop("key", None)
    req = pb.DecryptRequest(**kw)
    if key is not None:
        req.key.CopyFrom(key)
    return "decrypt", req


def _dig(**kw):
    key = kw.pop("key", None)
    req = pb.DigestRequest(**kw)
    if key is not None:
        req.key.CopyFrom(key)
    return "digest", req


def raw(k):
    return pb.KeySpec(raw=k)


BIG = os.urandom(DEFAULT_MAX_REQUEST + 1)
# accel_compress_bound(n) = n + n/256 + 1024; tag 16; named-key envelope 18.
SEALED_LIMIT = DEFAULT_MAX_REQUEST + (DEFAULT_MAX_REQUEST >> 8) + 1024 + 16 + 18
SEALED_OVER = os.urandom(SEALED_LIMIT + 1)

# (id, (kind, request), expected code, text the message must contain)
BAD_INPUT = [
    ("aes128-with-32-byte-key", _enc(algorithm=AES128, key=raw(K32)), INVALID, "16-byte key"),
    ("aes256-with-16-byte-key", _enc(algorithm=AES256, key=raw(K16)), INVALID, "32-byte key"),
    ("chacha-with-16-byte-key", _enc(algorithm=CHACHA, key=raw(K16)), INVALID, "32-byte key"),
    ("aes256-with-33-byte-key", _enc(algorithm=AES256, key=raw(K32 + b"x")), INVALID, "32-byte key"),
    ("aes128-empty-key", _enc(algorithm=AES128, key=raw(b"")), INVALID, "key"),
    ("decrypt-aes256-with-16-byte-key", _dec(algorithm=AES256, key=raw(K16)), INVALID, "32-byte key"),
    ("nonce-8-bytes", _enc(algorithm=AES256, key=raw(K32), nonce=N12[:8]), INVALID, "nonce must be 12 bytes"),
    ("nonce-16-bytes", _enc(algorithm=CHACHA, key=raw(K32), nonce=N12 + b"abcd"), INVALID, "nonce must be 12 bytes"),
    ("nonce-1-byte", _enc(algorithm=AES128, key=raw(K16), nonce=b"\x01"), INVALID, "nonce must be 12 bytes"),
    ("decrypt-nonce-empty", _dec(algorithm=AES256, key=raw(K32), nonce=b""), INVALID, "nonce must be 12 bytes"),
    ("decrypt-nonce-13-bytes", _dec(algorithm=AES256, key=raw(K32), nonce=N12 + b"x"), INVALID, "nonce"),
    ("algorithm-unset", _enc(key=raw(K32)), INVALID, "algorithm must be set"),
    ("decrypt-algorithm-unset", _dec(key=raw(K32)), INVALID, "algorithm must be set"),
    ("algorithm-unknown-99", _enc(algorithm=99, key=raw(K32)), INVALID, "99"),
    ("algorithm-is-a-digest-number", _enc(algorithm=32, key=raw(K32)), INVALID, "32"),
    ("decrypt-algorithm-unknown-19", _dec(algorithm=19, key=raw(K32)), INVALID, "19"),
    ("key-missing", _enc(algorithm=AES256), INVALID, "key is required"),
    ("key-spec-empty", _enc(algorithm=AES256, key=pb.KeySpec()), INVALID, "key is required"),
    ("decrypt-key-missing", _dec(algorithm=AES256), INVALID, "key is required"),
    ("ciphertext-15-bytes", _dec(algorithm=AES256, key=raw(K32), ciphertext=SEALED_AES256[:15]), INVALID,
     "shorter than the 16-byte tag"),
    ("ciphertext-empty", _dec(algorithm=AES256, key=raw(K32), ciphertext=b""), INVALID, "shorter than the 16-byte tag"),
    ("aad-over-64k", _enc(algorithm=AES256, key=raw(K32), aad=bytes(MAX_AAD + 1)), EXHAUSTED, str(MAX_AAD)),
    ("decrypt-aad-over-64k", _dec(algorithm=AES256, key=raw(K32), aad=bytes(MAX_AAD + 1)), EXHAUSTED, str(MAX_AAD)),
    ("encrypt-payload-over-limit", _enc(algorithm=AES256, key=raw(K32), plaintext=BIG), EXHAUSTED,
     str(DEFAULT_MAX_REQUEST)),
    # Decrypt accepts whatever Encrypt can return (request limit + compress bound + tag + envelope),
    # so "over the limit" for a ciphertext is past that allowance.
    ("decrypt-payload-over-limit", _dec(algorithm=AES256, key=raw(K32), ciphertext=SEALED_OVER), EXHAUSTED,
     str(SEALED_LIMIT)),
    ("digest-payload-over-limit", _dig(algorithm=SHA256, data=BIG), EXHAUSTED, str(DEFAULT_MAX_REQUEST)),
    ("hmac-payload-over-limit", _dig(algorithm=HMAC_SHA256, key=raw(K32), data=BIG), EXHAUSTED,
     str(DEFAULT_MAX_REQUEST)),
    ("hmac-sha256-without-key", _dig(algorithm=HMAC_SHA256, data=b"abc"), INVALID, "key"),
    ("hmac-sha512-without-key", _dig(algorithm=HMAC_SHA512, data=b"abc"), INVALID, "key"),
    ("hmac-empty-key-spec", _dig(algorithm=HMAC_SHA256, key=pb.KeySpec(), data=b"abc"), INVALID, "key"),
    ("hmac-empty-raw-key", _dig(algorithm=HMAC_SHA512, key=raw(b""), data=b"abc"), INVALID, "key"),
    ("sha256-with-key", _dig(algorithm=SHA256, key=raw(K32), data=b"abc"), INVALID, "takes no key"),
    ("crc32-with-key", _dig(algorithm=CRC32, key=raw(K16), data=b"abc"), INVALID, "takes no key"),
    ("digest-unset", _dig(data=b"abc"), INVALID, "digest algorithm"),
    ("digest-unknown-99", _dig(algorithm=99, data=b"abc"), INVALID, "99"),
    ("digest-is-a-cipher-number", _dig(algorithm=16, data=b"abc"), INVALID, "16"),
    ("named-key-without-keyring", _enc(algorithm=AES256, key=pb.KeySpec(name="orders"), nonce=b""), PRECONDITION,
     "keyring"),
    ("decrypt-named-key-without-keyring", _dec(key=pb.KeySpec(name="orders"), nonce=b""), PRECONDITION, "keyring"),
    ("hmac-named-key-without-keyring", _dig(algorithm=HMAC_SHA256, key=pb.KeySpec(name="mac"), data=b"a"),
     PRECONDITION, "keyring"),
]


def _method(stub, kind):
    return {"encrypt": stub.Encrypt, "decrypt": stub.Decrypt, "digest": stub.Digest}[kind]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input(stub, case):
    name, (kind, req), code, contains = case
    o = call(_method(stub, kind), req)
    expect_code(o, code, contains=contains, what=name)
    assert "retry-after-ms" not in o.trailing, f"{name}: a retry hint on a request that cannot succeed"
    crypto_round_trip(stub, name)


def test_bad_input_boundaries_pass(stub):
    """The values just inside each limit are accepted."""
    o = encrypt(stub, alg=AES256, key=K32, nonce=N12, aad=bytes(MAX_AAD), plaintext=b"x")
    assert o.ok, f"AAD of exactly {MAX_AAD} bytes -> {o.describe()}"
    assert py_aead(AES256, K32).decrypt(N12, o.response.ciphertext, bytes(MAX_AAD)) == b"x"
    d = decrypt(stub, alg=AES256, key=K32, nonce=N12, aad=bytes(MAX_AAD), ciphertext=o.response.ciphertext)
    assert d.ok and d.response.plaintext == b"x", d.describe()
    full = BIG[:DEFAULT_MAX_REQUEST]
    o = digest(stub, SHA512, full, timeout=BIG_TIMEOUT_S)
    assert o.ok and o.response.digest == hashlib.sha512(full).digest(), o.describe()
    # A 16-byte ciphertext is a bare tag over an empty plaintext.
    tag_only = py_aead(AES128, K16).encrypt(N12, b"", b"")
    o = decrypt(stub, alg=AES128, key=K16, nonce=N12, ciphertext=tag_only)
    assert o.ok and o.response.plaintext == b"", o.describe()


@pytest.mark.parametrize("chain", [None, GZIP], ids=["plain", "gzip-chain"])
@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
def test_largest_encrypt_output_decrypts(stub, alg, chain):
    """Whatever Encrypt returns, Decrypt must accept: a plaintext at the request limit
    is either refused by Encrypt (RESOURCE_EXHAUSTED), or its ciphertext (limit + 16
    bytes; with a chain, the compressed size + 16) opens again in the service."""
    rng = random.Random(SEED + 12 + alg)
    key, nonce = rng.randbytes(KEY_LEN[alg]), rng.randbytes(12)
    pt = rng.randbytes(DEFAULT_MAX_REQUEST)  # random: compression cannot shrink it
    comp = pb.ChainedCompression(format=chain, level=1) if chain else None
    o = encrypt(stub, alg=alg, key=key, nonce=nonce, plaintext=pt, compress=comp, timeout=BIG_TIMEOUT_S)
    if not o.ok:
        expect_code(o, EXHAUSTED, what=f"Encrypt of {len(pt)} bytes (the request limit)")
        return
    sealed = o.response.ciphertext
    packed = py_aead(alg, key).decrypt(nonce, sealed, b"")
    assert (py_decompress_strict(chain, packed) if chain else packed) == pt
    d = decrypt(stub, alg=alg, key=key, nonce=nonce, ciphertext=sealed, timeout=BIG_TIMEOUT_S,
                decompress=pb.ChainedCompression(format=chain) if chain else None)
    assert d.ok, (f"Encrypt accepted a {len(pt)}-byte plaintext and returned {len(sealed)} bytes, "
                  f"but Decrypt of exactly that output -> {d.describe()}")
    assert d.response.plaintext == pt


def test_bad_input_on_submit_stream(stub):
    """The same bad jobs on one Submit stream, mixed with good ones: each bad job gets
    the unary call's code, the good ones still succeed, and the stream survives."""
    jobs, expected = [], {}
    good_pt = b"good job"
    for i, (name, (kind, req), code, contains) in enumerate(BAD_INPUT):
        jobs.append((f"bad-{name}", kind, req))
        expected[f"bad-{name}"] = (code, contains)
        req = pb.EncryptRequest(algorithm=AES256, key=pb.KeySpec(raw=K32), nonce=N12, aad=str(i).encode(),
                                plaintext=good_pt)
        jobs.append((f"good-{i}", "encrypt", req))
    results = submit_all(stub, jobs, timeout=BIG_TIMEOUT_S)
    bad = []
    for jid, r in results.items():
        if jid.startswith("good-"):
            i = jid[5:]
            if r.code != 0:
                bad.append(f"{jid}: {code_of(r.code).name} {r.message!r}")
            elif py_aead(AES256, K32).decrypt(N12, r.encrypt.ciphertext, i.encode()) != good_pt:
                bad.append(f"{jid}: wrong ciphertext")
        else:
            code, contains = expected[jid]
            if code_of(r.code) != code or contains.lower() not in r.message.lower():
                bad.append(f"{jid}: expected {code.name} ~{contains!r}, got {code_of(r.code).name} {r.message!r}")
            elif r.WhichOneof("result") is not None:
                bad.append(f"{jid}: failed but carries a result")
            elif r.retry_after_ms != 0:
                bad.append(f"{jid}: retry_after_ms {r.retry_after_ms} on a request that cannot succeed")
    assert not bad, "\n".join(bad)
    crypto_round_trip(stub, "bad jobs on a Submit stream")
    assert_serves(stub, what="bad crypto jobs")


# ---------------------------------------------------------------------------------------
# Back-pressure on the Submit stream

SLOW_SMALL_QUEUE = ("--queues", 1, "--engines", 1, "--in-flight-per-queue", 1, "--engine-cap-mbps", 20,
                    "--tenant-max-queued-jobs", 2)


def test_crypto_jobs_on_submit_wait_instead_of_failing(start_server):
    """The Submit contract: while the tenant's queue is full the stream back-pressures;
    admission rejections are not returned as job failures. Compress jobs are the
    control; crypto jobs on the same kind of stream must behave the same way. A slow
    device (20 MB/s, one descriptor in flight) and a tenant queue of 2 jobs make the
    queue fill; 40 jobs of 64 KiB take about 0.15 s of device time per kind."""
    srv = start_server(*SLOW_SMALL_QUEUE, label="submit-backpressure")
    stub = srv.stub()
    rng = random.Random(SEED + 13)
    key, data = rng.randbytes(32), rng.randbytes(64 * KiB)
    nonce = rng.randbytes(12)
    sealed = py_aead(AES256, key).encrypt(nonce, data, b"")
    kinds = {
        "compress": lambda i: ("compress", pb.CompressRequest(format=GZIP, level=1, data=data)),
        "digest": lambda i: ("digest", pb.DigestRequest(algorithm=SHA256, data=data)),
        "hmac": lambda i: ("digest", pb.DigestRequest(algorithm=HMAC_SHA256, key=pb.KeySpec(raw=key), data=data)),
        "encrypt": lambda i: ("encrypt", pb.EncryptRequest(algorithm=AES256, key=pb.KeySpec(raw=key),
                                                           nonce=i.to_bytes(12, "big"), plaintext=data)),
        "decrypt": lambda i: ("decrypt", pb.DecryptRequest(algorithm=AES256, key=pb.KeySpec(raw=key), nonce=nonce,
                                                           ciphertext=sealed)),
    }
    summary = {}
    for name, make in kinds.items():
        jobs = [(f"{name}-{i}", *make(i)) for i in range(40)]
        res = submit_all(stub, jobs, timeout=BIG_TIMEOUT_S)
        failed = [f"{jid}: {code_of(r.code).name} {r.message!r}" for jid, r in res.items() if r.code != 0]
        summary[name] = failed
    assert not summary["compress"], "control: compress jobs failed on a Submit stream:\n" + \
        "\n".join(summary["compress"][:5])
    bad = {k: v for k, v in summary.items() if v}
    assert not bad, "crypto jobs on a Submit stream failed instead of waiting for room:\n" + "\n".join(
        f"{k}: {len(v)} of 40 failed, e.g. {v[0]}" for k, v in bad.items())
    crypto_round_trip(stub, "a full tenant queue")


def test_zz_raw_keys_never_logged(stub, server):
    """Runs last in the module (pytest keeps file order): no raw key sent by this
    module, in good or failing requests, appears in the session server's log."""
    rng = random.Random(SEED + 11)
    for alg in ALGS:
        key = _remember(f"log-check-{CIPHER_NAMES[alg]}", rng.randbytes(KEY_LEN[alg]))
        o = encrypt(stub, alg=alg, key=key, nonce=N12, plaintext=b"log check")
        assert o.ok, o.describe()
        sealed = o.response.ciphertext
        o = decrypt(stub, alg=alg, key=key, nonce=N12, ciphertext=sealed[:-1] + bytes([sealed[-1] ^ 1]))
        expect_code(o, INVALID, what="a bad tag")
        wrong = _remember(f"log-check-wrong-length-{CIPHER_NAMES[alg]}", rng.randbytes(KEY_LEN[alg] + 3))
        expect_code(encrypt(stub, alg=alg, key=wrong, nonce=N12, plaintext=b"x"), INVALID, what="a wrong-length key")
    hkey = _remember("log-check-hmac", rng.randbytes(300))
    assert digest(stub, HMAC_SHA512, b"log check", key=hkey).ok
    expect_code(digest(stub, SHA256, b"x", key=hkey), INVALID, what="SHA256 with a key")
    assert_no_key_material(log_bytes(server), _SENT_KEYS, f"the session server log {server.log_path}")


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS)
@pytest.mark.parametrize("fmt", [DEFLATE, ZLIB, GZIP], ids=["deflate", "zlib", "gzip"])
def test_chain_with_an_empty_plaintext_is_a_clean_error(stub, alg, fmt):
    """Issue 17, finding 1: a ciphertext of exactly one tag leaves a Decrypt+decompress
    chain with an empty middle buffer; that aborted the whole gateway (a precondition
    in the driver). It is now an ordinary job error, and the server keeps serving."""
    rng = random.Random(SEED + 40 + alg + fmt)
    key, nonce = rng.randbytes(KEY_LEN[alg]), rng.randbytes(12)
    chain = pb.ChainedCompression(format=fmt)
    # 16 random bytes: the tag does not verify.
    o = decrypt(stub, alg=alg, key=key, nonce=nonce, ciphertext=rng.randbytes(16), decompress=chain)
    expect_code(o, INVALID, what="Decrypt+decompress of a bare random tag")
    assert o.details == AUTH_FAILED, o.details
    # An authentic empty plaintext: decrypts, then nothing to decompress.
    sealed = py_aead(alg, key).encrypt(nonce, b"", b"")
    assert len(sealed) == 16
    o = decrypt(stub, alg=alg, key=key, nonce=nonce, ciphertext=sealed, decompress=chain)
    expect_code(o, INVALID, what="Decrypt+decompress of an authentic empty plaintext")
    # And the reverse chain of an empty plaintext round-trips.
    e = encrypt(stub, alg=alg, key=key, nonce=nonce, plaintext=b"", compress=chain)
    assert e.ok, e.describe()
    d = decrypt(stub, alg=alg, key=key, nonce=nonce, ciphertext=e.response.ciphertext, decompress=chain)
    assert d.ok and d.response.plaintext == b"", d.describe()
    assert_serves(stub, what="after empty-plaintext chains")


def test_chain_with_an_empty_plaintext_on_submit(stub):
    """The same chain inside a Submit stream: a per-job error, the stream goes on."""
    key, nonce = os.urandom(32), os.urandom(12)
    jobs = []
    for i in range(4):
        r = pb.SubmitRequest(id=str(i + 1))
        r.decrypt.algorithm = AES256
        r.decrypt.key.raw = key
        r.decrypt.nonce = nonce
        r.decrypt.ciphertext = os.urandom(16)
        r.decrypt.decompress.format = GZIP
        jobs.append(r)
    ok = pb.SubmitRequest(id="9")
    ok.digest.algorithm = CRC32
    ok.digest.data = b"still here"
    jobs.append(ok)
    replies = {r.id: r for r in stub.Submit(iter(jobs), timeout=30)}
    assert set(replies) == {"1", "2", "3", "4", "9"}, replies
    for i in "1234":
        assert replies[i].code == grpc.StatusCode.INVALID_ARGUMENT.value[0], replies[i]
    assert replies["9"].code == 0 and replies["9"].digest.checksum == zlib.crc32(b"still here"), replies["9"]
