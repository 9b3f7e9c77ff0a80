"""The public API on gRPC's C core (issue 18).

An independent client (grpcio) checks the unary job calls and health Check
against Python's own zlib, gzip, zstandard, hashlib and cryptography; that a
bad request gets its documented status and message (the answers the
grpc-swift edge gave, kept when the C core took over); that an unknown method
is answered UNIMPLEMENTED at once; and that a message over the limit is
answered RESOURCE_EXHAUSTED on a connection that keeps working.
"""
import concurrent.futures
import gzip
import hashlib
import os
import time
import zlib

import grpc
import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from accelgate.v1 import accelerator_pb2 as pb
from agtest import Tenant, bearer, call, new_key, text_bytes, write_tenants
from agstubs_health import health_pb2, health_pb2_grpc

KEY = new_key("core")


@pytest.fixture(scope="module")
def edge(tmp_path_factory, request):
    from conftest import ServerProcess
    path = write_tenants(str(tmp_path_factory.mktemp("core") / "tenants.yaml"), [Tenant("core", [KEY])])
    srv = ServerProcess("core-edge", ["--tenants", path]).start()
    request.addfinalizer(srv.stop)
    return srv


@pytest.fixture(scope="module")
def core(edge):
    return edge.stub()


MD = bearer(KEY)


@pytest.mark.parametrize("fmt,check", [
    (pb.COMPRESSION_FORMAT_GZIP, gzip.decompress),
    (pb.COMPRESSION_FORMAT_ZLIB, zlib.decompress),
    (pb.COMPRESSION_FORMAT_DEFLATE, lambda b: zlib.decompress(b, -15)),
    (pb.COMPRESSION_FORMAT_ZSTD, lambda b: zstandard.ZstdDecompressor().decompress(b)),
])
@pytest.mark.parametrize("size", [0, 1, 4096, 1 << 20])
def test_compress_is_read_back_by_python(core, fmt, check, size):
    data = text_bytes(size, seed=size + fmt)
    o = call(core.Compress, pb.CompressRequest(format=fmt, level=1, data=data), metadata=MD)
    assert o.ok, o.describe()
    assert check(o.response.data) == data
    assert o.response.stats.input_bytes == size
    assert o.response.stats.engine


def test_decompress_of_python_output(core):
    data = text_bytes(300_000, seed=3)
    o = call(core.Decompress, pb.DecompressRequest(format=pb.COMPRESSION_FORMAT_GZIP, data=gzip.compress(data)),
             metadata=MD)
    assert o.ok, o.describe()
    assert o.response.data == data


def test_aead_both_ways_against_cryptography(core):
    key, nonce, aad = os.urandom(32), os.urandom(12), b"header"
    data = text_bytes(5000, seed=5)
    spec = pb.KeySpec(raw=key)
    o = call(core.Encrypt, pb.EncryptRequest(algorithm=pb.CIPHER_ALGORITHM_AES_256_GCM, key=spec, nonce=nonce,
                                             aad=aad, plaintext=data), metadata=MD)
    assert o.ok, o.describe()
    assert AESGCM(key).decrypt(nonce, o.response.ciphertext, aad) == data
    sealed = AESGCM(key).encrypt(nonce, data, aad)
    o = call(core.Decrypt, pb.DecryptRequest(algorithm=pb.CIPHER_ALGORITHM_AES_256_GCM, key=spec, nonce=nonce,
                                             aad=aad, ciphertext=sealed), metadata=MD)
    assert o.ok, o.describe()
    assert o.response.plaintext == data
    tampered = bytes([sealed[0] ^ 1]) + sealed[1:]
    o = call(core.Decrypt, pb.DecryptRequest(algorithm=pb.CIPHER_ALGORITHM_AES_256_GCM, key=spec, nonce=nonce,
                                             aad=aad, ciphertext=tampered), metadata=MD)
    assert o.code == grpc.StatusCode.INVALID_ARGUMENT and o.details == "authentication failed", o.describe()


def test_digests_match_hashlib_and_zlib(core):
    data = text_bytes(70_000, seed=7)
    o = call(core.Digest, pb.DigestRequest(algorithm=pb.DIGEST_ALGORITHM_SHA256, data=data), metadata=MD)
    assert o.ok and o.response.digest == hashlib.sha256(data).digest(), o.describe()
    o = call(core.Digest, pb.DigestRequest(algorithm=pb.DIGEST_ALGORITHM_CRC32, data=data), metadata=MD)
    assert o.ok and o.response.checksum == zlib.crc32(data), o.describe()


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD = [
    ("Compress", pb.CompressRequest(data=b"x"), INVALID, "format must be set (DEFLATE, ZLIB, GZIP, ZSTD or LZ4)"),
    ("Compress", pb.CompressRequest(format=pb.COMPRESSION_FORMAT_ZSTD, level=20), INVALID,
     "level 20 is outside 1...19 for zstd (or -1 for the default)"),
    ("Compress", pb.CompressRequest(format=99), INVALID, "unknown compression format 99"),
    ("Decompress", pb.DecompressRequest(format=pb.COMPRESSION_FORMAT_GZIP, data=b"not gzip at all"), INVALID,
     "decompress: corrupt input"),
    ("Encrypt", pb.EncryptRequest(algorithm=pb.CIPHER_ALGORITHM_AES_256_GCM, key=pb.KeySpec(raw=b"short")), INVALID,
     "aes256GCM needs a 32-byte key, got 5"),
    ("Encrypt", pb.EncryptRequest(key=pb.KeySpec(name="nope")), grpc.StatusCode.FAILED_PRECONDITION,
     "the server has no keyring; use a raw key"),
    ("Decrypt", pb.DecryptRequest(algorithm=pb.CIPHER_ALGORITHM_AES_128_GCM, key=pb.KeySpec(raw=bytes(16)),
                                  nonce=bytes(12), ciphertext=bytes(15)), INVALID,
     "ciphertext is shorter than the 16-byte tag"),
    ("Decrypt", pb.DecryptRequest(algorithm=pb.CIPHER_ALGORITHM_AES_256_GCM, key=pb.KeySpec(raw=bytes(32)),
                                  nonce=bytes(12), ciphertext=bytes(16), decompress=pb.ChainedCompression(
                                      format=pb.COMPRESSION_FORMAT_GZIP)), INVALID, "authentication failed"),
    ("Digest", pb.DigestRequest(algorithm=pb.DIGEST_ALGORITHM_HMAC_SHA256), INVALID, "hmacSHA256 needs a key"),
    ("Digest", pb.DigestRequest(), INVALID, "unknown or unset digest algorithm 0"),
]


@pytest.mark.parametrize("method,request_,code,details", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_request_gets_its_documented_answer(core, method, request_, code, details):
    """The answers the grpc-swift edge gave (compared side by side while both edges served), kept."""
    o = call(getattr(core, method), request_, metadata=MD)
    assert (o.code, o.details) == (code, details), o.describe()


def test_calls_need_a_known_key(core):
    req = pb.CompressRequest(format=pb.COMPRESSION_FORMAT_GZIP, data=b"abc")
    o = call(core.Compress, req)
    assert (o.code, o.details) == (grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <api-key>' metadata")
    o = call(core.Compress, req, metadata=bearer("wrong"))
    assert (o.code, o.details) == (grpc.StatusCode.UNAUTHENTICATED, "unknown API key")


def test_unknown_methods_are_unimplemented_at_once(edge):
    ch = grpc.insecure_channel(f"127.0.0.1:{edge.port}")
    try:
        for path, words in [("/no.Such/Method", "unknown method /no.Such/Method"),
                            ("/accelgate.v1.Accelerator/NoSuchMethod", "unknown method /accelgate.v1.Accelerator/NoSuchMethod")]:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary(path)(b"", timeout=10, metadata=MD)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert words in e.value.details()
            assert time.monotonic() - start < 5
    finally:
        ch.close()


def test_a_message_over_the_limit_is_resource_exhausted_and_the_connection_lives(edge):
    ch = grpc.insecure_channel(f"127.0.0.1:{edge.port}", options=[("grpc.max_send_message_length", 64 << 20)])
    try:
        from accelgate.v1 import accelerator_pb2_grpc
        stub = accelerator_pb2_grpc.AcceleratorStub(ch)
        # The transport's limit is 4 x max_request_bytes + 64 KiB (about 16 MiB).
        o = call(stub.Compress, pb.CompressRequest(format=pb.COMPRESSION_FORMAT_GZIP, data=bytes(17 << 20)),
                 metadata=MD)
        assert o.code == grpc.StatusCode.RESOURCE_EXHAUSTED, o.describe()
        o = call(stub.Compress, pb.CompressRequest(format=pb.COMPRESSION_FORMAT_GZIP, data=b"still here"),
                 metadata=MD)
        assert o.ok and gzip.decompress(o.response.data) == b"still here", o.describe()
        # Over the request limit but under the transport's: the service's own refusal.
        o = call(stub.Compress, pb.CompressRequest(format=pb.COMPRESSION_FORMAT_GZIP, data=bytes((4 << 20) + 1)),
                 metadata=MD)
        assert (o.code, o.details) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f"payload of {(4 << 20) + 1} bytes exceeds the {4 << 20}-byte limit")
    finally:
        ch.close()


def test_health_check(edge):
    ch = grpc.insecure_channel(f"127.0.0.1:{edge.port}")
    try:
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="accelgate.v1.Accelerator"), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            health.Check(health_pb2.HealthCheckRequest(service="other"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        ch.close()


def test_a_deadline_ends_the_call_and_its_job(edge, core):
    data = text_bytes(3 << 20, seed=11)
    o = call(core.Compress, pb.CompressRequest(format=pb.COMPRESSION_FORMAT_ZLIB, level=9, data=data), timeout=0.001,
             metadata=MD)
    assert o.code == grpc.StatusCode.DEADLINE_EXCEEDED, o.describe()
    # The server goes on serving, and nothing of the call is left queued.
    o = call(core.Compress, pb.CompressRequest(format=pb.COMPRESSION_FORMAT_ZLIB, data=b"after"), metadata=MD)
    assert o.ok, o.describe()


def test_many_calls_at_once_are_all_answered_right(core):
    datas = [text_bytes(1000 + 37 * i, seed=i) for i in range(64)]

    def one(d):
        o = call(core.Compress, pb.CompressRequest(format=pb.COMPRESSION_FORMAT_GZIP, level=1, data=d), metadata=MD)
        return o.ok and gzip.decompress(o.response.data) == d

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert all(pool.map(one, datas * 4))


def test_request_ids_come_back_on_refusals_too(core):
    stub = core
    o = call(stub.Digest, pb.DigestRequest(algorithm=pb.DIGEST_ALGORITHM_SHA256, data=b"a"),
             metadata=MD + (("x-request-id", "abc-123"),))
    assert o.ok, o.describe()
    # A refusal before any job (a typed RequestError) carries it as well.
    o = call(stub.Digest, pb.DigestRequest(), metadata=MD + (("x-request-id", "abc-124"),))
    assert o.code == grpc.StatusCode.INVALID_ARGUMENT, o.describe()
    assert o.trailing.get("x-request-id") == "abc-124", o.describe()
