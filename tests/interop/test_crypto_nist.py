"""Known-answer tests: NIST CAVP vectors (from the cryptography-vectors package)
through the service.

* AES-GCM (gcmEncryptExtIV / gcmDecrypt, 128- and 256-bit keys): only the 96-bit
  IV, 128-bit tag sections, the only shape the service offers. Every such vector
  in the files is used (375 per file); encrypt must give exactly CT || Tag, decrypt
  must give PT, and the vectors marked FAIL must be refused with INVALID_ARGUMENT
  "authentication failed" and no plaintext.
* SHA-256/384/512 ShortMsg and LongMsg: every vector (Monte Carlo not used).
* HMAC-SHA-256/512: the NIST HMACVS file (HMAC.rsp) is not shipped in the
  installed cryptography-vectors (its HMAC/ folder holds only the RFC test-case
  files), so the RFC 4231 test cases are used instead; they are all full-length
  MACs (the RFC's truncated-output case is not in the files) and include the
  larger-than-block keys that must be pre-hashed. test_crypto_crosscheck.py adds
  HMACs of random keys of every interesting length against Python's hmac.

The vectors go through the Submit stream (one stream per file, all jobs pipelined),
which takes a few seconds in total; a deterministic sample (every 7th vector) also
goes through the unary RPCs on a thread pool, so both paths are covered. Each
vector is first checked against Python's own implementation, so a parsing mistake
fails loudly instead of testing nothing.
"""
import hashlib
import hmac

import grpc
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agtest import pb
from cryptohelp import (AES128, AES256, AUTH_FAILED, HMAC_SHA256, HMAC_SHA512, INVALID, SHA256, SHA384, SHA512,
                        code_of, decrypt, digest, encrypt, parallel, parse_rsp, submit_all, unhex)

GCM_FILES = {
    (AES128, "encrypt"): "ciphers/AES/GCM/gcmEncryptExtIV128.rsp",
    (AES128, "decrypt"): "ciphers/AES/GCM/gcmDecrypt128.rsp",
    (AES256, "encrypt"): "ciphers/AES/GCM/gcmEncryptExtIV256.rsp",
    (AES256, "decrypt"): "ciphers/AES/GCM/gcmDecrypt256.rsp",
}
UNARY_SAMPLE_EVERY = 7
STREAM_TIMEOUT_S = 300


def _gcm_vectors(alg, direction):
    path = GCM_FILES[(alg, direction)]
    vectors = []
    for r in parse_rsp(path):
        s = r["_section"]
        if s.get("IVlen") != "96" or s.get("Taglen") != "128":
            continue
        v = {
            "id": f"{direction}-{s['Keylen']}-{s['PTlen']}-{s['AADlen']}-{r['Count']}",
            "key": unhex(r["Key"]), "iv": unhex(r["IV"]), "aad": unhex(r.get("AAD")),
            "ct": unhex(r.get("CT")), "tag": unhex(r["Tag"]), "fail": r.get("FAIL", False),
            "pt": None if r.get("FAIL") else unhex(r.get("PT")),
        }
        assert len(v["key"]) == (16 if alg == AES128 else 32) and len(v["iv"]) == 12 and len(v["tag"]) == 16, v["id"]
        assert len(v["ct"]) * 8 == int(s["PTlen"]) and len(v["aad"]) * 8 == int(s["AADlen"]), v["id"]
        # The vector itself, checked with Python's AES-GCM.
        if v["fail"]:
            with pytest.raises(InvalidTag):
                AESGCM(v["key"]).decrypt(v["iv"], v["ct"] + v["tag"], v["aad"])
        else:
            assert AESGCM(v["key"]).encrypt(v["iv"], v["pt"], v["aad"]) == v["ct"] + v["tag"], v["id"]
        vectors.append(v)
    # 15 vectors for each of the 25 (PTlen, AADlen) pairs in the 96/128 sections.
    assert len(vectors) >= 300, f"{path}: only {len(vectors)} vectors with 96-bit IV and 128-bit tag"
    return vectors


def _aead_label(alg):
    return {AES128: "aes128", AES256: "aes256"}[alg]


@pytest.mark.parametrize("alg", [AES128, AES256], ids=_aead_label)
def test_gcm_encrypt_vectors(stub, alg):
    vectors = _gcm_vectors(alg, "encrypt")
    jobs = [(v["id"], "encrypt", pb.EncryptRequest(algorithm=alg, key=pb.KeySpec(raw=v["key"]), nonce=v["iv"],
                                                   aad=v["aad"], plaintext=v["pt"])) for v in vectors]
    results = submit_all(stub, jobs, timeout=STREAM_TIMEOUT_S)
    bad = []
    for v in vectors:
        r = results[v["id"]]
        if r.code != 0:
            bad.append(f"{v['id']}: {code_of(r.code).name} {r.message!r}")
        elif r.WhichOneof("result") != "encrypt":
            bad.append(f"{v['id']}: OK but result is {r.WhichOneof('result')}")
        elif r.encrypt.ciphertext != v["ct"] + v["tag"]:
            bad.append(f"{v['id']}: ciphertext {r.encrypt.ciphertext.hex()} != CT||Tag {(v['ct'] + v['tag']).hex()}")
        elif r.encrypt.nonce != v["iv"] or r.encrypt.key_version != 0:
            bad.append(f"{v['id']}: nonce {r.encrypt.nonce.hex()} / key_version {r.encrypt.key_version} "
                       f"(want {v['iv'].hex()} / 0)")
    assert not bad, f"{len(bad)} of {len(vectors)} encrypt vectors wrong via Submit:\n" + "\n".join(bad[:20])

    def unary(v):
        o = encrypt(stub, alg=alg, key=v["key"], nonce=v["iv"], aad=v["aad"], plaintext=v["pt"])
        if not o.ok:
            return f"{v['id']}: {o.describe()}"
        if o.response.ciphertext != v["ct"] + v["tag"]:
            return f"{v['id']}: unary ciphertext {o.response.ciphertext.hex()} != {(v['ct'] + v['tag']).hex()}"
        return None

    bad = [b for b in parallel(unary, vectors[::UNARY_SAMPLE_EVERY]) if b]
    assert not bad, "unary Encrypt disagrees with the vectors:\n" + "\n".join(bad[:20])


@pytest.mark.parametrize("alg", [AES128, AES256], ids=_aead_label)
def test_gcm_decrypt_vectors(stub, alg):
    vectors = _gcm_vectors(alg, "decrypt")
    fails = sum(v["fail"] for v in vectors)
    assert 0 < fails < len(vectors), "the decrypt file should hold both passing and FAIL vectors"
    jobs = [(v["id"], "decrypt", pb.DecryptRequest(algorithm=alg, key=pb.KeySpec(raw=v["key"]), nonce=v["iv"],
                                                   aad=v["aad"], ciphertext=v["ct"] + v["tag"])) for v in vectors]
    results = submit_all(stub, jobs, timeout=STREAM_TIMEOUT_S)
    bad = []
    for v in vectors:
        r = results[v["id"]]
        if v["fail"]:
            if code_of(r.code) != INVALID or r.message != AUTH_FAILED:
                bad.append(f"{v['id']} (FAIL vector): expected INVALID_ARGUMENT {AUTH_FAILED!r}, "
                           f"got {code_of(r.code).name} {r.message!r}")
            elif r.WhichOneof("result") is not None:
                bad.append(f"{v['id']} (FAIL vector): refused but a {r.WhichOneof('result')} result came along")
        else:
            if r.code != 0:
                bad.append(f"{v['id']}: {code_of(r.code).name} {r.message!r}")
            elif r.WhichOneof("result") != "decrypt" or r.decrypt.plaintext != v["pt"]:
                bad.append(f"{v['id']}: plaintext {r.decrypt.plaintext.hex()} != PT {v['pt'].hex()}")
            elif r.decrypt.key_version != 0:
                bad.append(f"{v['id']}: key_version {r.decrypt.key_version} for a raw key")
    assert not bad, f"{len(bad)} of {len(vectors)} decrypt vectors wrong via Submit:\n" + "\n".join(bad[:20])

    def unary(v):
        o = decrypt(stub, alg=alg, key=v["key"], nonce=v["iv"], aad=v["aad"], ciphertext=v["ct"] + v["tag"])
        if v["fail"]:
            if o.code != grpc.StatusCode.INVALID_ARGUMENT or o.details != AUTH_FAILED:
                return f"{v['id']} (FAIL vector): unary Decrypt -> {o.describe()}"
        elif not o.ok or o.response.plaintext != v["pt"]:
            return f"{v['id']}: unary Decrypt -> {o.describe()}"
        return None

    sample = vectors[::UNARY_SAMPLE_EVERY]
    assert any(v["fail"] for v in sample) and not all(v["fail"] for v in sample)
    bad = [b for b in parallel(unary, sample) if b]
    assert not bad, "unary Decrypt disagrees with the vectors:\n" + "\n".join(bad[:20])


SHA_FILES = [(alg, kind) for alg in (SHA256, SHA384, SHA512) for kind in ("ShortMsg", "LongMsg")]


def _sha_label(p):
    alg, kind = p
    return f"{ {SHA256: 'sha256', SHA384: 'sha384', SHA512: 'sha512'}[alg]}-{kind}"


@pytest.mark.parametrize("alg,kind", SHA_FILES, ids=[_sha_label(p) for p in SHA_FILES])
def test_sha2_vectors(stub, alg, kind):
    name = {SHA256: "SHA256", SHA384: "SHA384", SHA512: "SHA512"}[alg]
    path = f"hashes/SHA2/{name}{kind}.rsp"
    vectors = []
    for i, r in enumerate(parse_rsp(path)):
        bits = int(r["Len"])
        assert bits % 8 == 0, f"{path}: bit-oriented vector {bits}"
        msg = unhex(r["Msg"])[:bits // 8]  # Len = 0 comes with Msg = 00
        md = unhex(r["MD"])
        assert hashlib.new(name.lower(), msg).digest() == md, f"{path} vector {i} disagrees with hashlib"
        vectors.append((f"{name}-{kind}-{i}-{bits}", msg, md))
    assert len(vectors) >= 64, f"{path}: only {len(vectors)} vectors"
    if kind == "ShortMsg":
        assert vectors[0][1] == b"", "ShortMsg should start with the empty message"
    jobs = [(vid, "digest", pb.DigestRequest(algorithm=alg, data=msg)) for vid, msg, _ in vectors]
    results = submit_all(stub, jobs, timeout=STREAM_TIMEOUT_S)
    bad = []
    for vid, msg, md in vectors:
        r = results[vid]
        if r.code != 0:
            bad.append(f"{vid}: {code_of(r.code).name} {r.message!r}")
        elif r.digest.digest != md:
            bad.append(f"{vid}: {r.digest.digest.hex()} != {md.hex()}")
        elif r.digest.checksum != 0:
            bad.append(f"{vid}: checksum field {r.digest.checksum} set for a hash")
    assert not bad, f"{len(bad)} of {len(vectors)} {path} vectors wrong:\n" + "\n".join(bad[:20])

    def unary(v):
        vid, msg, md = v
        o = digest(stub, alg, msg)
        return None if o.ok and o.response.digest == md else f"{vid}: unary Digest -> {o.describe()} " \
            f"{o.response.digest.hex() if o.ok else ''}"

    bad = [b for b in parallel(unary, vectors[::UNARY_SAMPLE_EVERY]) if b]
    assert not bad, "unary Digest disagrees with the vectors:\n" + "\n".join(bad)


HMAC_FILES = {HMAC_SHA256: ("HMAC/rfc-4231-sha256.txt", "sha256", 32),
              HMAC_SHA512: ("HMAC/rfc-4231-sha512.txt", "sha512", 64)}


@pytest.mark.parametrize("alg", [HMAC_SHA256, HMAC_SHA512], ids=["hmac-sha256", "hmac-sha512"])
def test_hmac_vectors(stub, alg):
    path, hname, length = HMAC_FILES[alg]
    vectors = []
    for i, r in enumerate(parse_rsp(path)):
        key, msg, md = unhex(r["Key"]), unhex(r["Msg"]), unhex(r["MD"])
        assert int(r["Len"]) == len(msg) * 8, f"{path} vector {i}: Len {r['Len']} vs {len(msg)}-byte message"
        if len(md) != length:  # only full-length MACs (Tlen == L)
            continue
        assert hmac.new(key, msg, hname).digest() == md, f"{path} vector {i} disagrees with Python's hmac"
        vectors.append((f"{hname}-{i}", key, msg, md))
    assert len(vectors) >= 5, f"{path}: only {len(vectors)} full-length vectors"
    block = 64 if alg == HMAC_SHA256 else 128
    assert any(len(k) > block for _, k, _, _ in vectors), "no larger-than-block key among the vectors"
    jobs = [(vid, "digest", pb.DigestRequest(algorithm=alg, key=pb.KeySpec(raw=key), data=msg))
            for vid, key, msg, _ in vectors]
    results = submit_all(stub, jobs, timeout=STREAM_TIMEOUT_S)
    bad = []
    for vid, key, msg, md in vectors:
        r = results[vid]
        if r.code != 0:
            bad.append(f"{vid} ({len(key)}-byte key): {code_of(r.code).name} {r.message!r}")
        elif r.digest.digest != md:
            bad.append(f"{vid} ({len(key)}-byte key): {r.digest.digest.hex()} != {md.hex()}")
        o = digest(stub, alg, msg, key=key)
        if not o.ok or o.response.digest != md:
            bad.append(f"{vid} ({len(key)}-byte key): unary Digest -> {o.describe()}")
    assert not bad, f"HMAC vectors wrong:\n" + "\n".join(bad)


def test_gcm_vector_tampering(stub):
    """Each passing decrypt vector's ciphertext with one bit flipped (tag, body, AAD
    or IV) must fail authentication: a sample of 30 vectors per key size."""
    jobs = []
    for alg in (AES128, AES256):
        good = [v for v in _gcm_vectors(alg, "decrypt") if not v["fail"]]
        for v in good[::max(1, len(good) // 30)]:
            variants = {"tag": (v["iv"], v["aad"], v["ct"] + bytes([v["tag"][0] ^ 1]) + v["tag"][1:]),
                        "iv": (bytes([v["iv"][0] ^ 0x80]) + v["iv"][1:], v["aad"], v["ct"] + v["tag"])}
            if v["ct"]:
                variants["ct"] = (v["iv"], v["aad"], v["ct"][:-1] + bytes([v["ct"][-1] ^ 0x10]) + v["tag"])
            aad = v["aad"][:-1] + bytes([v["aad"][-1] ^ 4]) if v["aad"] else b"\x00"
            variants["aad"] = (v["iv"], aad, v["ct"] + v["tag"])
            for what, (iv, aad, sealed) in variants.items():
                jid = f"{v['id']}-{what}"
                jobs.append((jid, "decrypt", pb.DecryptRequest(algorithm=alg, key=pb.KeySpec(raw=v["key"]), nonce=iv,
                                                               aad=aad, ciphertext=sealed)))
                with pytest.raises(InvalidTag):
                    AESGCM(v["key"]).decrypt(iv, sealed, aad)
    results = submit_all(stub, jobs, timeout=STREAM_TIMEOUT_S)
    bad = [f"{jid}: {code_of(r.code).name} {r.message!r}" for jid, r in results.items()
           if code_of(r.code) != INVALID or r.message != AUTH_FAILED or r.WhichOneof("result") is not None]
    assert not bad, f"{len(bad)} of {len(jobs)} tampered vectors were not refused as {AUTH_FAILED!r}:\n" + \
        "\n".join(bad[:20])
