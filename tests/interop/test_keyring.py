"""Named, versioned keys (--keyring): envelopes checked independently in Python,
rotation by SIGHUP, retirement (min_decryption_version, disabled versions),
tenant ownership, the nonce budget and its persistence across restarts
(--nonce-state), the audit log (--audit-log) and key hygiene in every log.

Keyring files are written by the tests with fresh random keys (docs/KEYS.md,
Sources/AccelService/Keyring.swift); the envelope is
`A6 01 | version u32 BE | nonce 12 | ct || tag`, with the 6 header bytes
prepended to the AAD.
"""
import base64
import concurrent.futures as cf
import hmac
import json
import os
import random
import subprocess
import threading
import time
import zlib

import grpc
import pytest
from cryptography.exceptions import InvalidTag

from agtest import (DEFAULT_MAX_REQUEST, GZIP, ZLIB, KiB, MiB, Tenant, new_key, pb, py_decompress_strict, text_bytes,
                    write_tenants)
from conftest import server_binary
from cryptohelp import (AES128, AES256, AUTH_FAILED, CIPHERS, DENIED, ENVELOPE_OVERHEAD, EXHAUSTED, HMAC_SHA256,
                        HMAC_SHA512, INVALID, MAX_AAD, NOT_FOUND, PRECONDITION, SHA256, TAG_LEN, KeyVersion, NamedKey,
                        assert_no_key_material, audit_matches, code_of, crypto_round_trip, decrypt, digest, encrypt,
                        envelope_header, envelope_version, expect_code, log_bytes, open_envelope, py_aead, read_audit,
                        reload_and_wait, seal_envelope, submit_all, wait_audit, write_keyring)

AEAD_NAMES = ["aes-128-gcm", "aes-256-gcm", "chacha20-poly1305"]


def _k(algorithm, length=None):
    if length is None:
        length = 16 if algorithm == "aes-128-gcm" else 32
    return os.urandom(length)


def _all_keys(keys):
    """{label: key bytes} for every version of every key."""
    return {f"{k.tenant}/{k.name}/v{v.version}": v.key for k in keys for v in k.versions}


# ---------------------------------------------------------------------------------------
# A module server with a fixed keyring (no state changes in these tests)

STATIC = [NamedKey(f"env-{a}", a, [KeyVersion(1, _k(a)), KeyVersion(2, _k(a))]) for a in AEAD_NAMES] + [
    NamedKey("mac256", "hmac-sha256", [KeyVersion(1, _k("hmac", 100))]),       # longer than the block: pre-hashed
    NamedKey("mac512", "hmac-sha512", [KeyVersion(1, _k("hmac", 32)), KeyVersion(2, _k("hmac", 48))]),
    NamedKey("mac512-long", "hmac-sha512", [KeyVersion(3, _k("hmac", 128))]),  # exactly the block
    NamedKey("someone-elses", "aes-256-gcm", [KeyVersion(1, _k("aes-256-gcm"))], tenant="other"),
]
STATIC_BY_NAME = {k.name: k for k in STATIC}


@pytest.fixture(scope="module")
def static(start_module_server, tmp_path_factory):
    d = tmp_path_factory.mktemp("static-keyring")
    ring = write_keyring(str(d / "keyring.yaml"), STATIC)
    srv = start_module_server("--keyring", ring, "--audit-log", str(d / "audit.log"), label="static")
    srv.audit_path = str(d / "audit.log")
    return srv


@pytest.mark.parametrize("algorithm", AEAD_NAMES)
def test_envelope_opens_in_python_and_back(static, algorithm):
    stub = static.stub()
    key = STATIC_BY_NAME[f"env-{algorithm}"]
    alg = CIPHERS[algorithm]
    rng = random.Random(7)
    for size in (0, 1, 1000, MiB):
        for aad in (b"", b"order-42", rng.randbytes(5000)):
            pt = rng.randbytes(size)
            o = encrypt(stub, name=key.name, aad=aad, plaintext=pt)
            assert o.ok, f"named Encrypt ({size} bytes) -> {o.describe()}"
            env = o.response.ciphertext
            assert o.response.key_version == 2, f"newest version is 2, Encrypt used {o.response.key_version}"
            assert env[:2] == b"\xa6\x01", f"envelope starts with {env[:2].hex()}, want a601"
            assert envelope_version(env) == 2, f"envelope version {envelope_version(env)}"
            assert len(env) == ENVELOPE_OVERHEAD + size + TAG_LEN, f"envelope is {len(env)} bytes for {size}"
            assert o.response.nonce == env[6:18], "response nonce differs from the envelope's nonce"
            # Independently: AAD = header || aad, nonce from the envelope, key version 2.
            assert open_envelope(alg, key.key(2), env, aad) == pt
            with pytest.raises(InvalidTag):  # the header really is bound into the AAD
                py_aead(alg, key.key(2)).decrypt(env[6:18], env[18:], aad)
            with pytest.raises(InvalidTag):
                open_envelope(alg, key.key(1), env, aad)
            d = decrypt(stub, name=key.name, aad=aad, ciphertext=env)
            assert d.ok and d.response.plaintext == pt, f"named Decrypt of its own envelope -> {d.describe()}"
            assert d.response.key_version == 2
    # Python-made envelopes under either version open in the service.
    for version in (1, 2):
        pt, aad = os.urandom(777), b"from python"
        env = seal_envelope(alg, key.key(version), version, pt, aad)
        d = decrypt(stub, name=key.name, aad=aad, ciphertext=env)
        assert d.ok, f"Python-made v{version} envelope -> {d.describe()}"
        assert d.response.plaintext == pt and d.response.key_version == version
        # Same body, header claiming the other version: must not open.
        other = 3 - version
        forged = envelope_header(other) + env[6:]
        d = decrypt(stub, name=key.name, aad=aad, ciphertext=forged)
        expect_code(d, INVALID, what=f"v{version} envelope relabelled as v{other}")
        assert d.details == AUTH_FAILED, d.details
        # Wrong AAD.
        d = decrypt(stub, name=key.name, aad=aad + b"!", ciphertext=env)
        expect_code(d, INVALID, what="named Decrypt with another AAD")
        assert d.details == AUTH_FAILED, d.details


def test_envelope_limits(static):
    """AAD of exactly 64 KiB works with a named key (the service adds 6 header bytes
    to it internally), one byte more is RESOURCE_EXHAUSTED; and whatever named Encrypt
    returns for a plaintext at the request limit, named Decrypt must accept (or
    Encrypt must refuse that plaintext with RESOURCE_EXHAUSTED)."""
    stub = static.stub()
    key = STATIC_BY_NAME["env-aes-256-gcm"]
    aad = os.urandom(MAX_AAD)
    o = encrypt(stub, name=key.name, aad=aad, plaintext=b"big aad")
    assert o.ok, f"named Encrypt with a {MAX_AAD}-byte AAD -> {o.describe()}"
    assert open_envelope(AES256, key.key(2), o.response.ciphertext, aad) == b"big aad"
    d = decrypt(stub, name=key.name, aad=aad, ciphertext=o.response.ciphertext)
    assert d.ok and d.response.plaintext == b"big aad", d.describe()
    expect_code(encrypt(stub, name=key.name, aad=aad + b"x", plaintext=b"x"), EXHAUSTED, what="AAD over 64 KiB")
    expect_code(decrypt(stub, name=key.name, aad=aad + b"x", ciphertext=o.response.ciphertext), EXHAUSTED,
                what="Decrypt with AAD over 64 KiB")

    pt = os.urandom(DEFAULT_MAX_REQUEST)
    o = encrypt(stub, name=key.name, plaintext=pt, timeout=120)
    if not o.ok:
        expect_code(o, EXHAUSTED, what=f"named Encrypt of {len(pt)} bytes (the request limit)")
        return
    env = o.response.ciphertext
    assert open_envelope(AES256, key.key(2), env) == pt
    d = decrypt(stub, name=key.name, ciphertext=env, timeout=120)
    assert d.ok, (f"named Encrypt accepted a {len(pt)}-byte plaintext and returned a {len(env)}-byte envelope, "
                  f"but Decrypt of exactly that envelope -> {d.describe()}")
    assert d.response.plaintext == pt


def test_envelope_algorithm_field(static):
    stub = static.stub()
    for algorithm in AEAD_NAMES:
        name = f"env-{algorithm}"
        o = encrypt(stub, alg=CIPHERS[algorithm], name=name, plaintext=b"same algorithm")
        assert o.ok, f"{name} with its own algorithm set -> {o.describe()}"
        d = decrypt(stub, alg=CIPHERS[algorithm], name=name, ciphertext=o.response.ciphertext)
        assert d.ok and d.response.plaintext == b"same algorithm", d.describe()
        for other in AEAD_NAMES:
            if other != algorithm:
                o = encrypt(stub, alg=CIPHERS[other], name=name, plaintext=b"x")
                expect_code(o, INVALID, contains=name, what=f"{algorithm} key asked for {other}")


def test_malformed_envelopes(static):
    stub = static.stub()
    key = STATIC_BY_NAME["env-aes-256-gcm"]
    pt, aad = b"payload", b"aad"
    env = seal_envelope(AES256, key.key(2), 2, pt, aad)
    cases = [
        ("wrong marker", b"\xa7" + env[1:], INVALID, "envelope"),
        ("wrong format version", env[:1] + b"\x02" + env[2:], INVALID, "envelope"),
        ("truncated below header+nonce+tag", env[:ENVELOPE_OVERHEAD + TAG_LEN - 1], INVALID, "envelope"),
        ("empty", b"", INVALID, "envelope"),
        ("a raw-key ciphertext", os.urandom(40), INVALID, "envelope"),
        ("unknown version 9", envelope_header(9) + env[6:], PRECONDITION, "version 9"),
        ("version 0", envelope_header(0) + env[6:], PRECONDITION, "version 0"),
        ("version 2^32-1", envelope_header(0xFFFFFFFF) + env[6:], PRECONDITION, "4294967295"),
    ]
    for what, ct, code, contains in cases:
        d = decrypt(stub, name=key.name, aad=aad, ciphertext=ct)
        expect_code(d, code, contains=contains, what=f"named Decrypt of {what}")
    d = decrypt(stub, name=key.name, aad=aad, ciphertext=env)
    assert d.ok and d.response.plaintext == pt, d.describe()


def test_named_key_refuses_caller_nonce(static):
    stub = static.stub()
    for algorithm in AEAD_NAMES:
        o = encrypt(stub, name=f"env-{algorithm}", nonce=os.urandom(12), plaintext=b"x")
        expect_code(o, INVALID, contains="nonce", what=f"named {algorithm} key with a caller nonce")
        o = encrypt(stub, name=f"env-{algorithm}", nonce=b"\x00" * 5, plaintext=b"x")
        expect_code(o, INVALID, what=f"named {algorithm} key with a 5-byte caller nonce")


def test_named_keys_draw_fresh_nonces(static):
    stub = static.stub()
    nonces = set()
    for _ in range(20):
        o = encrypt(stub, name="env-chacha20-poly1305", plaintext=b"same plaintext")
        assert o.ok, o.describe()
        nonces.add(o.response.ciphertext[6:18])
    assert len(nonces) == 20, f"20 encryptions used only {len(nonces)} distinct nonces"


def test_named_hmac(static):
    stub = static.stub()
    rng = random.Random(11)
    cases = [("mac256", HMAC_SHA256, "sha256", 1), ("mac512", HMAC_SHA512, "sha512", 2),
             ("mac512-long", HMAC_SHA512, "sha512", 3)]
    for name, alg, hname, version in cases:
        key = STATIC_BY_NAME[name].key(version)
        for n in (0, 1, 200, 100 * KiB):
            data = rng.randbytes(n)
            o = digest(stub, alg, data, name=name)
            assert o.ok, f"HMAC with named key {name} -> {o.describe()}"
            want = hmac.new(key, data, hname).digest()
            assert o.response.digest == want, \
                f"{name} (v{version}, {len(key)}-byte key), {n} bytes: {o.response.digest.hex()} != {want.hex()}"
    # Wrong kinds of use.
    expect_code(digest(stub, HMAC_SHA512, b"x", name="mac256"), INVALID, contains="mac256",
                what="hmac-sha256 key used for HMAC-SHA512")
    expect_code(digest(stub, HMAC_SHA256, b"x", name="env-aes-256-gcm"), INVALID, what="AEAD key used for HMAC")
    expect_code(encrypt(stub, name="mac256", plaintext=b"x"), INVALID, contains="mac256",
                what="HMAC key used for Encrypt")
    expect_code(decrypt(stub, name="mac512", ciphertext=seal_envelope(AES256, os.urandom(32), 1, b"x")), INVALID,
                what="HMAC key used for Decrypt")
    expect_code(digest(stub, SHA256, b"x", name="mac256"), INVALID, contains="no key", what="SHA256 with a key name")


def test_unknown_name_and_foreign_key(static):
    stub = static.stub()
    env = seal_envelope(AES256, os.urandom(32), 1, b"x")
    for what, o in [
        ("Encrypt", encrypt(stub, name="no-such-key", plaintext=b"x")),
        ("Decrypt", decrypt(stub, name="no-such-key", ciphertext=env)),
        ("HMAC", digest(stub, HMAC_SHA256, b"x", name="no-such-key")),
    ]:
        expect_code(o, NOT_FOUND, contains="no-such-key", what=f"{what} with an unknown key name")
    # Without a tenants file the caller is tenant "default"; "someone-elses" belongs to "other".
    for what, o in [
        ("Encrypt", encrypt(stub, name="someone-elses", plaintext=b"x")),
        ("Decrypt", decrypt(stub, name="someone-elses", ciphertext=env)),
        ("HMAC", digest(stub, HMAC_SHA256, b"x", name="someone-elses")),
    ]:
        expect_code(o, DENIED, what=f"{what} with another tenant's key")
    crypto_round_trip(stub, "lookups that failed")


def test_named_chain(static):
    stub = static.stub()
    key = STATIC_BY_NAME["env-aes-128-gcm"]
    pt = text_bytes(2 * MiB, seed=5)
    o = encrypt(stub, name=key.name, aad=b"chained", plaintext=pt, compress=pb.ChainedCompression(format=GZIP, level=1))
    assert o.ok, f"named Encrypt+compress -> {o.describe()}"
    assert len(o.response.ciphertext) < len(pt) // 2, "a compressible 2 MiB text was not compressed"
    packed = open_envelope(AES128, key.key(2), o.response.ciphertext, b"chained")
    assert py_decompress_strict(GZIP, packed) == pt
    d = decrypt(stub, name=key.name, aad=b"chained", ciphertext=o.response.ciphertext,
                decompress=pb.ChainedCompression(format=GZIP))
    assert d.ok and d.response.plaintext == pt, d.describe()
    # And a Python-made compressed envelope through Decrypt+decompress.
    env = seal_envelope(AES128, key.key(1), 1, zlib.compress(pt, 9), b"py")
    d = decrypt(stub, name=key.name, aad=b"py", ciphertext=env, decompress=pb.ChainedCompression(format=ZLIB))
    assert d.ok and d.response.plaintext == pt and d.response.key_version == 1, d.describe()


def test_named_keys_on_submit_stream(static):
    stub = static.stub()
    key = STATIC_BY_NAME["env-aes-256-gcm"]
    jobs = []
    for i in range(30):
        jobs.append((f"enc-{i}", "encrypt", pb.EncryptRequest(key=pb.KeySpec(name=key.name), aad=str(i).encode(),
                                                              plaintext=f"job {i}".encode() * 50)))
    jobs.append(("hmac", "digest", pb.DigestRequest(algorithm=HMAC_SHA256, key=pb.KeySpec(name="mac256"), data=b"s")))
    jobs.append(("foreign", "encrypt", pb.EncryptRequest(key=pb.KeySpec(name="someone-elses"), plaintext=b"x")))
    jobs.append(("unknown", "encrypt", pb.EncryptRequest(key=pb.KeySpec(name="nope"), plaintext=b"x")))
    jobs.append(("nonce", "encrypt", pb.EncryptRequest(key=pb.KeySpec(name=key.name), nonce=bytes(12), plaintext=b"x")))
    res = submit_all(stub, jobs, timeout=120)
    for i in range(30):
        r = res[f"enc-{i}"]
        assert r.code == 0, f"enc-{i}: {code_of(r.code).name} {r.message!r}"
        assert r.encrypt.key_version == 2
        assert open_envelope(AES256, key.key(2), r.encrypt.ciphertext, str(i).encode()) == f"job {i}".encode() * 50
    assert res["hmac"].code == 0 and res["hmac"].digest.digest == hmac.new(
        STATIC_BY_NAME["mac256"].key(1), b"s", "sha256").digest()
    assert code_of(res["foreign"].code) == DENIED, res["foreign"]
    assert code_of(res["unknown"].code) == NOT_FOUND, res["unknown"]
    assert code_of(res["nonce"].code) == INVALID, res["nonce"]


def test_static_keys_never_logged(static):
    """After everything above: no key of the static keyring in the server log or the
    audit log (module order: this runs after the tests that use the server)."""
    stub = static.stub()
    assert encrypt(stub, name="env-aes-256-gcm", plaintext=b"x").ok
    keys = _all_keys(STATIC)
    assert_no_key_material(log_bytes(static), keys, f"server log {static.log_path}")
    with open(static.audit_path, "rb") as f:
        audit = f.read()
    assert audit.strip(), "the audit log is empty after many named-key operations"
    assert_no_key_material(audit, keys, "the audit log")


# ---------------------------------------------------------------------------------------
# Rotation and retirement (each test has its own server)


def test_rotation_by_sighup(start_server, tmp_path):
    v1, v2, v3 = _k("aes-256-gcm"), _k("aes-256-gcm"), _k("aes-256-gcm")
    ring = str(tmp_path / "keyring.yaml")

    def write(versions, **kw):
        write_keyring(ring, [NamedKey("orders", "aes-256-gcm", versions, **kw)])

    write([KeyVersion(1, v1)])
    srv = start_server("--keyring", ring, label="rotation")
    stub = srv.stub()

    def enc(pt, aad=b"r"):
        o = encrypt(stub, name="orders", aad=aad, plaintext=pt)
        assert o.ok, f"Encrypt -> {o.describe()}"
        return o.response

    def dec(env, aad=b"r"):
        return decrypt(stub, name="orders", aad=aad, ciphertext=env)

    c1 = enc(b"one")
    assert c1.key_version == 1 and envelope_version(c1.ciphertext) == 1
    assert open_envelope(AES256, v1, c1.ciphertext, b"r") == b"one"

    # Add v2, reload: new encryptions use v2, v1 envelopes still open.
    write([KeyVersion(1, v1), KeyVersion(2, v2)])
    reload_and_wait(srv)
    c2 = enc(b"two")
    assert c2.key_version == 2 and envelope_version(c2.ciphertext) == 2, \
        f"after adding v2 and SIGHUP, Encrypt used v{c2.key_version}"
    assert open_envelope(AES256, v2, c2.ciphertext, b"r") == b"two"
    for env, pt, v in [(c1.ciphertext, b"one", 1), (c2.ciphertext, b"two", 2)]:
        d = dec(env)
        assert d.ok and d.response.plaintext == pt and d.response.key_version == v, \
            f"v{v} envelope after rotation -> {d.describe()}"

    # Retire v1 with min_decryption_version 2.
    write([KeyVersion(1, v1), KeyVersion(2, v2)], min_decryption_version=2)
    reload_and_wait(srv)
    expect_code(dec(c1.ciphertext), PRECONDITION, contains="version 1", what="v1 envelope below min_decryption_version")
    d = dec(c2.ciphertext)
    assert d.ok and d.response.plaintext == b"two", d.describe()
    assert enc(b"still v2").key_version == 2

    # Add v3 and disable v2: v3 encrypts, v2 envelopes are refused, v1 stays retired.
    write([KeyVersion(1, v1), KeyVersion(2, v2, disabled=True), KeyVersion(3, v3)], min_decryption_version=2)
    reload_and_wait(srv)
    c3 = enc(b"three")
    assert c3.key_version == 3 and open_envelope(AES256, v3, c3.ciphertext, b"r") == b"three"
    expect_code(dec(c2.ciphertext), PRECONDITION, contains="version 2", what="envelope of a disabled version")
    expect_code(dec(c1.ciphertext), PRECONDITION, what="v1 envelope below min_decryption_version")
    d = dec(c3.ciphertext)
    assert d.ok and d.response.plaintext == b"three" and d.response.key_version == 3, d.describe()

    # Re-enable v2 and lower the floor again: both old envelopes open again (nothing was destroyed).
    write([KeyVersion(1, v1), KeyVersion(2, v2, disabled=False), KeyVersion(3, v3)], min_decryption_version=1)
    reload_and_wait(srv)
    for env, pt in [(c1.ciphertext, b"one"), (c2.ciphertext, b"two"), (c3.ciphertext, b"three")]:
        d = dec(env)
        assert d.ok and d.response.plaintext == pt, d.describe()

    # Disable the newest: the newest enabled (v2) encrypts.
    write([KeyVersion(1, v1), KeyVersion(2, v2), KeyVersion(3, v3, disabled=True)])
    reload_and_wait(srv)
    c = enc(b"fallback")
    assert c.key_version == 2 and open_envelope(AES256, v2, c.ciphertext, b"r") == b"fallback"

    # Every version disabled: Encrypt refuses.
    write([KeyVersion(1, v1, True), KeyVersion(2, v2, True), KeyVersion(3, v3, True)])
    reload_and_wait(srv)
    expect_code(encrypt(stub, name="orders", plaintext=b"x"), PRECONDITION, what="Encrypt with every version disabled")
    expect_code(dec(c3.ciphertext), PRECONDITION, what="Decrypt with every version disabled")

    # Removing v3 from the file: its envelopes become unknown-version.
    write([KeyVersion(1, v1), KeyVersion(2, v2)])
    reload_and_wait(srv)
    expect_code(dec(c3.ciphertext), PRECONDITION, contains="version 3", what="envelope of a removed version")
    crypto_round_trip(stub, "rotations")


def test_calls_during_rotation_never_fail(start_server, tmp_path):
    """Rotation is 'no restart, no dropped calls': named encrypt/decrypt loops run
    while versions are added and SIGHUP is sent repeatedly."""
    ring = str(tmp_path / "keyring.yaml")
    versions = [KeyVersion(1, _k("chacha20-poly1305"))]
    write_keyring(ring, [NamedKey("live", "chacha20-poly1305", versions)])
    srv = start_server("--keyring", ring, label="live-rotation")
    stop = threading.Event()
    errors, seen_versions, counts = [], set(), [0]
    lock = threading.Lock()

    def worker(i):
        stub = srv.new_stub()
        n = 0
        while not stop.is_set():
            pt = f"worker {i} call {n}".encode()
            o = encrypt(stub, name="live", aad=b"w", plaintext=pt)
            if not o.ok:
                errors.append(f"Encrypt -> {o.describe()}")
                return
            d = decrypt(stub, name="live", aad=b"w", ciphertext=o.response.ciphertext)
            if not d.ok or d.response.plaintext != pt:
                errors.append(f"Decrypt of a v{o.response.key_version} envelope -> {d.describe()}")
                return
            with lock:
                seen_versions.add(o.response.key_version)
                counts[0] += 1
            n += 1

    with cf.ThreadPoolExecutor(max_workers=3) as ex:
        futures = [ex.submit(worker, i) for i in range(3)]
        try:
            for v in range(2, 8):
                time.sleep(0.15)
                versions.append(KeyVersion(v, _k("chacha20-poly1305")))
                write_keyring(ring, [NamedKey("live", "chacha20-poly1305", versions)])
                reload_and_wait(srv)
            time.sleep(0.3)
        finally:
            stop.set()
            for f in futures:
                f.result(60)
    assert not errors, f"{len(errors)} calls failed during rotation, e.g.:\n" + "\n".join(errors[:5])
    assert counts[0] > 20, f"only {counts[0]} round trips during rotation"
    assert 7 in seen_versions and len(seen_versions) >= 3, f"versions used: {sorted(seen_versions)}"


def test_encrypt_never_writes_undecryptable_envelopes(start_server, tmp_path):
    """If the only enabled version is below min_decryption_version, the service must not
    hand out an envelope it will then refuse to decrypt: either Encrypt fails with
    FAILED_PRECONDITION, or its output decrypts."""
    ring = str(tmp_path / "keyring.yaml")
    k1, k2 = _k("aes-256-gcm"), _k("aes-256-gcm")
    write_keyring(ring, [NamedKey("floor", "aes-256-gcm", [KeyVersion(1, k1), KeyVersion(2, k2, disabled=True)],
                                  min_decryption_version=2)])
    srv = start_server("--keyring", ring, label="floor")
    stub = srv.stub()
    o = encrypt(stub, name="floor", plaintext=b"write-only?")
    if o.ok:
        d = decrypt(stub, name="floor", ciphertext=o.response.ciphertext)
        assert d.ok and d.response.plaintext == b"write-only?", (
            f"Encrypt succeeded with key version {o.response.key_version} (below min_decryption_version 2), "
            f"but Decrypt of that envelope -> {d.describe()}: the data is unrecoverable")
    else:
        expect_code(o, PRECONDITION, what="Encrypt when no enabled version may decrypt")


def test_failed_reload_keeps_previous_keyring(start_server, tmp_path):
    ring = str(tmp_path / "keyring.yaml")
    k1 = _k("aes-128-gcm")
    write_keyring(ring, [NamedKey("keep", "aes-128-gcm", [KeyVersion(1, k1)])])
    srv = start_server("--keyring", ring, label="bad-reload")
    stub = srv.stub()
    c = encrypt(stub, name="keep", plaintext=b"before")
    assert c.ok, c.describe()
    bad_files = [
        "keys: [this is not: a keyring",                                       # YAML syntax
        "keys:\n  - name: keep\n    tenant: default\n    algorithm: rot13\n"    # unknown algorithm
        "    versions:\n      - { version: 1, key: \"AAAAAAAAAAAAAAAAAAAAAA==\" }\n",
        "keys:\n  - name: keep\n    tenant: default\n    algorithm: aes-128-gcm\n"  # 15-byte key
        "    versions:\n      - { version: 1, key: \"AAAAAAAAAAAAAAAAAAAA\" }\n",
        "keys:\n  - name: keep\n    tenant: default\n    algorithm: aes-128-gcm\n    versions: []\n",
    ]
    for text in bad_files:
        write_keyring(ring, text=text)
        reload_and_wait(srv, ok=False)
        o = encrypt(stub, name="keep", plaintext=b"after")
        assert o.ok and o.response.key_version == 1, f"after a failed reload the old keyring must stay: {o.describe()}"
        assert open_envelope(AES128, k1, o.response.ciphertext) == b"after"
        d = decrypt(stub, name="keep", ciphertext=c.response.ciphertext)
        assert d.ok and d.response.plaintext == b"before", d.describe()
    k2 = _k("aes-128-gcm")
    write_keyring(ring, [NamedKey("keep", "aes-128-gcm", [KeyVersion(1, k1), KeyVersion(2, k2)])])
    reload_and_wait(srv)
    o = encrypt(stub, name="keep", plaintext=b"fixed")
    assert o.ok and o.response.key_version == 2, o.describe()


def _malformed_keyring_with(key: bytes) -> str:
    """A keyring whose YAML breaks on the line that holds `key` (an unclosed flow
    mapping), the kind of typo an operator makes while rotating."""
    b64 = base64.b64encode(key).decode()
    return ("keys:\n  - name: leaky\n    tenant: default\n    algorithm: aes-256-gcm\n    versions:\n"
            f"      - {{ version: 1, key: \"{b64}\"\n"
            f"      - {{ version: 2, key: \"{b64}\", disabled: maybe }}\n")


def test_keyring_errors_do_not_log_keys_on_reload(start_server, tmp_path):
    """docs/KEYS.md: keys are never logged. A keyring file with a typo near a key must
    not put that key into the server log when SIGHUP fails to load it."""
    ring = str(tmp_path / "keyring.yaml")
    good = _k("aes-256-gcm")
    write_keyring(ring, [NamedKey("leaky", "aes-256-gcm", [KeyVersion(1, good)])])
    srv = start_server("--keyring", ring, label="leak-reload")
    secret = _k("aes-256-gcm")
    write_keyring(ring, text=_malformed_keyring_with(secret))
    reload_and_wait(srv, ok=False)
    # A type error in the same entry, too.
    write_keyring(ring, text=("keys:\n  - name: leaky\n    tenant: default\n    algorithm: aes-256-gcm\n"
                              f"    versions:\n      - {{ version: 1, key: \"{base64.b64encode(secret).decode()}\", "
                              "disabled: maybe }\n"))
    reload_and_wait(srv, ok=False)
    assert encrypt(srv.stub(), name="leaky", plaintext=b"x").ok
    assert_no_key_material(log_bytes(srv), {"secret (rejected file)": secret, "good": good},
                           f"server log {srv.log_path} after failed keyring reloads")


def test_keyring_errors_do_not_log_keys_at_startup(tmp_path):
    ring = str(tmp_path / "keyring.yaml")
    secret = _k("aes-256-gcm")
    write_keyring(ring, text=_malformed_keyring_with(secret))
    p = subprocess.run([server_binary(), "serve", "--host", "127.0.0.1", "--port", "0", "--no-metrics", "--keyring", ring],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    out = p.stdout + p.stderr
    assert p.returncode != 0, f"server started with a malformed keyring:\n{out.decode(errors='replace')[-2000:]}"
    assert b"keyring.yaml" in out, f"the startup error does not name the keyring file: {out[-1000:]!r}"
    assert_no_key_material(out, {"secret": secret}, "the startup error output")


# ---------------------------------------------------------------------------------------
# Tenants


def test_cross_tenant_isolation(start_server, tmp_path):
    alpha, beta = Tenant("alpha", [new_key("alpha")]), Tenant("beta", [new_key("beta")])
    tenants = write_tenants(str(tmp_path / "tenants.yaml"), [alpha, beta])
    keys = [
        NamedKey("orders", "aes-256-gcm", [KeyVersion(1, _k("aes-256-gcm"))], tenant="alpha"),
        NamedKey("orders", "aes-256-gcm", [KeyVersion(1, _k("aes-256-gcm"))], tenant="beta"),
        NamedKey("alpha-only", "chacha20-poly1305", [KeyVersion(1, _k("chacha20-poly1305"))], tenant="alpha"),
        NamedKey("alpha-mac", "hmac-sha256", [KeyVersion(1, _k("hmac", 40))], tenant="alpha"),
    ]
    ring = write_keyring(str(tmp_path / "keyring.yaml"), keys)
    audit = str(tmp_path / "audit.log")
    srv = start_server("--tenants", tenants, "--keyring", ring, "--audit-log", audit, label="tenants")
    stub = srv.stub()
    a_orders, b_orders, a_only, a_mac = keys

    # Same name, different tenants: each gets its own key.
    oa = encrypt(stub, name="orders", aad=b"t", plaintext=b"alpha data", metadata=alpha.md)
    ob = encrypt(stub, name="orders", aad=b"t", plaintext=b"beta data", metadata=beta.md)
    assert oa.ok and ob.ok, (oa.describe(), ob.describe())
    assert open_envelope(AES256, a_orders.key(1), oa.response.ciphertext, b"t") == b"alpha data"
    assert open_envelope(AES256, b_orders.key(1), ob.response.ciphertext, b"t") == b"beta data"
    with pytest.raises(InvalidTag):
        open_envelope(AES256, b_orders.key(1), oa.response.ciphertext, b"t")
    d = decrypt(stub, name="orders", aad=b"t", ciphertext=oa.response.ciphertext, metadata=beta.md)
    expect_code(d, INVALID, what="beta decrypting alpha's envelope with its own 'orders'")
    assert d.details == AUTH_FAILED, d.details
    d = decrypt(stub, name="orders", aad=b"t", ciphertext=oa.response.ciphertext, metadata=alpha.md)
    assert d.ok and d.response.plaintext == b"alpha data", d.describe()

    # Beta asking for alpha's keys by name.
    c = encrypt(stub, name="alpha-only", plaintext=b"secret", metadata=alpha.md)
    assert c.ok, c.describe()
    for what, o in [
        ("Encrypt", encrypt(stub, name="alpha-only", plaintext=b"x", metadata=beta.md)),
        ("Decrypt", decrypt(stub, name="alpha-only", ciphertext=c.response.ciphertext, metadata=beta.md)),
        ("HMAC", digest(stub, HMAC_SHA256, b"x", name="alpha-mac", metadata=beta.md)),
    ]:
        expect_code(o, DENIED, contains="another tenant", what=f"beta's {what} with alpha's key")
        assert b"secret" not in (o.details or "").encode()
    # Submit stream too.
    res = submit_all(stub, [("x", "decrypt", pb.DecryptRequest(key=pb.KeySpec(name="alpha-only"),
                                                               ciphertext=c.response.ciphertext))],
                     metadata=beta.md)
    assert code_of(res["x"].code) == DENIED and not res["x"].decrypt.plaintext, res["x"]
    # Unknown names, and the owner still works.
    expect_code(encrypt(stub, name="beta-nothing", plaintext=b"x", metadata=beta.md), NOT_FOUND,
                what="unknown key name")
    o = digest(stub, HMAC_SHA256, b"m", name="alpha-mac", metadata=alpha.md)
    assert o.ok and o.response.digest == hmac.new(a_mac.key(1), b"m", "sha256").digest(), o.describe()
    # No credentials at all.
    expect_code(encrypt(stub, name="orders", plaintext=b"x"), grpc.StatusCode.UNAUTHENTICATED,
                what="named Encrypt without an API key")

    wait_audit(audit, tenant="beta", key="alpha-only", outcome="denied")
    wait_audit(audit, tenant="alpha", key="alpha-only", operation="encrypt", outcome="ok", version=1)
    assert not [e for e in read_audit(audit) if audit_matches(e, tenant="beta", key="alpha-only", outcome="ok")], \
        "the audit log records a successful use of alpha's key by beta"
    with open(audit, "rb") as f:
        logs = log_bytes(srv) + f.read()
    assert_no_key_material(logs, _all_keys(keys), "server log + audit log")


# ---------------------------------------------------------------------------------------
# Nonce budget


def test_nonce_budget_survives_restart(start_server, tmp_path):
    ring = str(tmp_path / "keyring.yaml")
    state = str(tmp_path / "nonces.json")
    b1, b2, p1 = _k("aes-256-gcm"), _k("aes-256-gcm"), _k("aes-128-gcm")

    def keys(budget_versions, budget_max=3):
        return [NamedKey("budget", "aes-256-gcm", budget_versions, max_encryptions=budget_max),
                NamedKey("partial", "aes-128-gcm", [KeyVersion(1, p1)], max_encryptions=5)]

    write_keyring(ring, keys([KeyVersion(1, b1)]))
    flags = ("--keyring", ring, "--nonce-state", state)
    srv = start_server(*flags, label="budget-1")
    stub = srv.stub()
    sealed = []
    for i in range(3):
        o = encrypt(stub, name="budget", plaintext=f"msg {i}".encode())
        assert o.ok, f"encryption {i + 1} of 3 -> {o.describe()}"
        sealed.append(o.response.ciphertext)
    expect_code(encrypt(stub, name="budget", plaintext=b"4th"), PRECONDITION, contains="rotate",
                what="4th encryption with max_encryptions 3")
    res = submit_all(stub, [("s", "encrypt", pb.EncryptRequest(key=pb.KeySpec(name="budget"), plaintext=b"s"))])
    assert code_of(res["s"].code) == PRECONDITION, f"4th encryption via Submit: {res['s']}"
    # Decryption is not limited by the budget.
    for i, env in enumerate(sealed):
        d = decrypt(stub, name="budget", ciphertext=env)
        assert d.ok and d.response.plaintext == f"msg {i}".encode(), d.describe()
    # A reload with the same file does not reset the count.
    reload_and_wait(srv)
    expect_code(encrypt(stub, name="budget", plaintext=b"after reload"), PRECONDITION,
                what="exhausted version after SIGHUP")
    partial_ok = sum(encrypt(stub, name="partial", plaintext=b"p").ok for _ in range(2))
    assert partial_ok == 2
    assert os.path.exists(state), "--nonce-state file was not written"
    json.load(open(state))  # valid JSON
    srv.stop()

    # Restart with the same files: the budget is not reset.
    srv = start_server(*flags, label="budget-2")
    stub = srv.stub()
    expect_code(encrypt(stub, name="budget", plaintext=b"after restart"), PRECONDITION, contains="rotate",
                what="4th encryption after a restart (the count must persist)")
    more = sum(encrypt(stub, name="partial", plaintext=b"p").ok for _ in range(6))
    assert more <= 3, f"'partial' (max 5) had 2 encryptions before the restart and {more} after: the count went back"
    for i, env in enumerate(sealed):
        d = decrypt(stub, name="budget", ciphertext=env)
        assert d.ok and d.response.plaintext == f"msg {i}".encode(), d.describe()

    # Rotation gives a fresh budget for the new version.
    write_keyring(ring, keys([KeyVersion(1, b1), KeyVersion(2, b2)]))
    reload_and_wait(srv)
    for i in range(3):
        o = encrypt(stub, name="budget", plaintext=b"v2")
        assert o.ok and o.response.key_version == 2, f"v2 encryption {i + 1} -> {o.describe()}"
        assert open_envelope(AES256, b2, o.response.ciphertext) == b"v2"
    expect_code(encrypt(stub, name="budget", plaintext=b"v2 4th"), PRECONDITION, what="v2's 4th encryption")
    srv.stop()

    # And once more after another restart, with a lowered budget.
    write_keyring(ring, keys([KeyVersion(1, b1), KeyVersion(2, b2)], budget_max=2))
    srv = start_server(*flags, label="budget-3")
    expect_code(encrypt(srv.stub(), name="budget", plaintext=b"x"), PRECONDITION, what="v2 after the second restart")


def test_nonce_budget_exact_under_concurrency(start_server, tmp_path):
    ring = str(tmp_path / "keyring.yaml")
    write_keyring(ring, [NamedKey("race", "aes-256-gcm", [KeyVersion(1, _k("aes-256-gcm"))], max_encryptions=20)])
    srv = start_server("--keyring", ring, "--nonce-state", str(tmp_path / "n.json"), label="budget-race")
    stubs = [srv.new_stub() for _ in range(4)]
    barrier = threading.Barrier(8)

    def one(i):
        barrier.wait(30) if i < 8 else None
        return encrypt(stubs[i % 4], name="race", plaintext=b"r")

    with cf.ThreadPoolExecutor(max_workers=8) as ex:
        outcomes = list(ex.map(one, range(60)))
    ok = [o for o in outcomes if o.ok]
    others = [o for o in outcomes if not o.ok]
    assert len(ok) == 20, f"max_encryptions 20, 60 concurrent calls: {len(ok)} succeeded"
    for o in others:
        expect_code(o, PRECONDITION, what="encryption over the budget")
    nonces = {o.response.ciphertext[6:18] for o in ok}
    assert len(nonces) == 20, "nonces repeated"


# ---------------------------------------------------------------------------------------
# Audit log


def test_audit_log(start_server, tmp_path):
    keys = [
        NamedKey("aud", "aes-256-gcm", [KeyVersion(1, _k("aes-256-gcm")), KeyVersion(2, _k("aes-256-gcm"))],
                 min_decryption_version=2),
        NamedKey("aud-small", "chacha20-poly1305", [KeyVersion(4, _k("chacha20-poly1305"))], max_encryptions=1),
        NamedKey("aud-mac", "hmac-sha512", [KeyVersion(1, _k("hmac", 64))]),
        NamedKey("foreign", "aes-128-gcm", [KeyVersion(1, _k("aes-128-gcm"))], tenant="elsewhere"),
    ]
    ring = write_keyring(str(tmp_path / "keyring.yaml"), keys)
    audit = str(tmp_path / "audit.log")
    srv = start_server("--keyring", ring, "--audit-log", audit, "--nonce-state", str(tmp_path / "n.json"),
                       "--log-level", "trace", label="audit")
    stub = srv.stub()
    aud = keys[0]

    encs = [encrypt(stub, name="aud", aad=b"a", plaintext=f"{i}".encode()) for i in range(5)]
    assert all(o.ok for o in encs), [o.describe() for o in encs]
    d = decrypt(stub, name="aud", aad=b"a", ciphertext=encs[0].response.ciphertext)
    assert d.ok, d.describe()
    bad = encs[1].response.ciphertext
    expect_code(decrypt(stub, name="aud", aad=b"other", ciphertext=bad), INVALID, what="wrong AAD")
    expect_code(decrypt(stub, name="aud", ciphertext=seal_envelope(AES256, aud.key(1), 1, b"old")), PRECONDITION,
                what="retired v1")
    expect_code(decrypt(stub, name="aud", ciphertext=envelope_header(7) + bad[6:]), PRECONDITION, what="unknown v7")
    assert encrypt(stub, name="aud-small", plaintext=b"once").ok
    expect_code(encrypt(stub, name="aud-small", plaintext=b"twice"), PRECONDITION, what="budget of 1")
    o = digest(stub, HMAC_SHA512, b"mac me", name="aud-mac")
    assert o.ok and o.response.digest == hmac.new(keys[2].key(1), b"mac me", "sha512").digest(), o.describe()
    expect_code(encrypt(stub, name="foreign", plaintext=b"x"), DENIED, what="other tenant's key")
    expect_code(encrypt(stub, name="ghost", plaintext=b"x"), NOT_FOUND, what="unknown key")
    reload_and_wait(srv)  # a reload must not log keys either
    assert encrypt(stub, name="aud", plaintext=b"after reload").ok

    expected = [
        dict(tenant="default", key="aud", version=2, operation="encrypt", outcome="ok"),
        dict(tenant="default", key="aud", version=2, operation="decrypt", outcome="ok"),
        dict(tenant="default", key="aud", version=2, operation="decrypt", outcome="error"),
        dict(tenant="default", key="aud", version=1, operation="decrypt", outcome="retired"),
        dict(tenant="default", key="aud", version=7, operation="decrypt", outcome="unknown-version"),
        dict(tenant="default", key="aud-small", version=4, operation="encrypt", outcome="ok"),
        dict(tenant="default", key="aud-small", version=4, operation="encrypt", outcome="exhausted"),
        dict(tenant="default", key="aud-mac", version=1, operation="hmac", outcome="ok"),
        dict(tenant="default", key="foreign", outcome="denied"),
        dict(tenant="default", key="ghost", outcome="denied"),
    ]
    for want in expected:
        wait_audit(audit, **want)
    entries = read_audit(audit)
    for e in entries:
        for field in ("time", "tenant", "key", "version", "operation", "outcome"):
            assert field in e, f"audit entry lacks {field!r}: {e}"
    n_ok = len([e for e in entries if audit_matches(e, key="aud", operation="encrypt", outcome="ok")])
    assert n_ok == 6, f"6 successful encryptions with 'aud', {n_ok} audit entries say so"
    assert not [e for e in entries if audit_matches(e, key="aud", operation="decrypt", outcome="ok", version=1)], \
        "a retired version is logged as a successful decryption"

    all_keys = _all_keys(keys)
    with open(audit, "rb") as f:
        assert_no_key_material(f.read(), all_keys, "the audit log")
    assert_no_key_material(log_bytes(srv), all_keys, f"the server log {srv.log_path}")

    # The audit log is append-only: a restarted server keeps the old lines and adds new ones.
    srv.stop()
    before = read_audit(audit)
    srv = start_server("--keyring", ring, "--audit-log", audit, "--nonce-state", str(tmp_path / "n.json"),
                       label="audit-2")
    assert encrypt(srv.stub(), name="aud", plaintext=b"after restart").ok
    wait_audit(audit, key="aud", operation="encrypt", outcome="ok")
    deadline = time.monotonic() + 10
    while len(read_audit(audit)) <= len(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    after = read_audit(audit)
    assert after[:len(before)] == before, "a restarted server rewrote the existing audit lines"
    assert len(after) == len(before) + 1 and audit_matches(after[-1], key="aud", operation="encrypt", outcome="ok",
                                                           version=2), f"new lines after restart: {after[len(before):]}"


def test_bare_envelope_through_a_chain_is_a_clean_error(static):
    """Issue 17, finding 1: a named-key envelope of exactly header + nonce + tag (34 bytes)
    leaves the decrypt+decompress chain an empty middle buffer; it aborted the gateway."""
    stub = static.stub()
    key = STATIC_BY_NAME["env-aes-256-gcm"]
    chain = pb.ChainedCompression(format=GZIP)
    forged = envelope_header(2) + os.urandom(12 + TAG_LEN)
    assert len(forged) == 34
    d = decrypt(stub, name=key.name, ciphertext=forged, decompress=chain)
    expect_code(d, INVALID, what="named Decrypt+decompress of a forged 34-byte envelope")
    empty = seal_envelope(AES256, key.key(2), 2, b"")
    assert len(empty) == 34
    d = decrypt(stub, name=key.name, ciphertext=empty, decompress=chain)
    expect_code(d, INVALID, what="named Decrypt+decompress of an authentic empty envelope")
    d = decrypt(stub, name=key.name, ciphertext=empty)
    assert d.ok and d.response.plaintext == b"", d.describe()
