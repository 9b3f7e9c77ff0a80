"""zstd and LZ4 frames as outside implementations see them: Python's zstandard
and lz4 packages (the reference C libraries' bindings, built independently of
ours) read what the service writes and write what it reads; caps, corrupt,
truncated and checksum-damaged input get the same statuses as the deflate family."""
import os

import grpc
import lz4.frame
import pytest
import zstandard

from agtest import pb

ZSTD = pb.COMPRESSION_FORMAT_ZSTD
LZ4 = pb.COMPRESSION_FORMAT_LZ4


def py_compress(fmt, data, level=None):
    if fmt == ZSTD:
        return zstandard.ZstdCompressor(level=level or 3, write_checksum=True).compress(data)
    return lz4.frame.compress(data, compression_level=level or 0, content_checksum=True)


def py_decompress(fmt, blob):
    if fmt == ZSTD:
        return zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    return lz4.frame.decompress(blob)


def payloads():
    text = b"".join(b"%d GET /api/v1/items/%d 200 %dms\n" % (i, i * 31 % 977, i % 53) for i in range(40000))
    return {"text": text, "random": os.urandom(300_000), "empty": b"", "one": b"x", "zeros": bytes(2 << 20)}


@pytest.mark.parametrize("fmt", [ZSTD, LZ4], ids=["zstd", "lz4"])
@pytest.mark.parametrize("name", list(payloads()))
def test_service_output_is_read_by_python_and_python_output_by_the_service(stub, fmt, name):
    data = payloads()[name]
    levels = [1, 3, 19] if fmt == ZSTD else [0, 3, 12]
    for level in levels:
        r = stub.Compress(pb.CompressRequest(format=fmt, level=level, data=data), timeout=60)
        assert py_decompress(fmt, r.data) == data, (name, level)
        if name == "text":
            assert len(r.data) < len(data) // 3
    r = stub.Compress(pb.CompressRequest(format=fmt, data=data), timeout=60)  # default level
    assert py_decompress(fmt, r.data) == data
    d = stub.Decompress(pb.DecompressRequest(format=fmt, data=py_compress(fmt, data)), timeout=60)
    assert d.data == data
    assert d.stats.engine in ("zstd", "lz4")


@pytest.mark.parametrize("fmt", [ZSTD, LZ4], ids=["zstd", "lz4"])
def test_bad_input_gets_the_documented_status(stub, fmt):
    data = payloads()["text"][:200_000]
    blob = py_compress(fmt, data)

    def code(payload, cap=0):
        try:
            stub.Decompress(pb.DecompressRequest(format=fmt, data=payload, max_output_bytes=cap), timeout=30)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    assert code(blob, cap=len(data) - 1) == grpc.StatusCode.RESOURCE_EXHAUSTED  # the bomb cap
    assert code(blob, cap=len(data)) == grpc.StatusCode.OK
    assert code(blob[:-9]) == grpc.StatusCode.INVALID_ARGUMENT  # truncated
    assert code(b"") == grpc.StatusCode.INVALID_ARGUMENT
    assert code(os.urandom(4000)) == grpc.StatusCode.INVALID_ARGUMENT  # not a frame
    damaged = bytearray(blob)
    damaged[-1] ^= 0xFF  # the content checksum
    assert code(bytes(damaged)) == grpc.StatusCode.DATA_LOSS
    assert code(blob + blob) == grpc.StatusCode.OK  # concatenated frames
    # A small frame that inflates far past the server's limit is refused, not buffered.
    bomb = py_compress(fmt, bytes(64 << 20))
    assert len(bomb) < 1 << 20
    assert code(bomb) == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("fmt,bad", [(ZSTD, 20), (ZSTD, 0), (LZ4, 13)], ids=["zstd-20", "zstd-0", "lz4-13"])
def test_levels_outside_the_range_are_refused(stub, fmt, bad):
    with pytest.raises(grpc.RpcError) as e:
        stub.Compress(pb.CompressRequest(format=fmt, level=bad, data=b"x"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside" in e.value.details()


def test_describe_device_lists_zstd_and_lz4_with_their_levels(stub):
    d = stub.DescribeDevice(pb.DescribeDeviceRequest(), timeout=10)
    caps = {(c.operation, c.format): c for c in d.capabilities}
    z = caps[(pb.OPERATION_COMPRESS, ZSTD)]
    assert (z.min_level, z.max_level, z.default_level) == (1, 19, 3)
    l4 = caps[(pb.OPERATION_COMPRESS, LZ4)]
    assert (l4.min_level, l4.max_level, l4.default_level) == (0, 12, 0)


def test_encrypt_can_chain_zstd_and_decrypt_can_chain_lz4(stub):
    key = os.urandom(32)
    data = payloads()["text"]
    for fmt in (ZSTD, LZ4):
        sealed = stub.Encrypt(pb.EncryptRequest(algorithm=pb.CIPHER_ALGORITHM_AES_256_GCM, key=pb.KeySpec(raw=key),
                                                plaintext=data, compress=pb.ChainedCompression(format=fmt)), timeout=30)
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        assert py_decompress(fmt, AESGCM(key).decrypt(sealed.nonce, sealed.ciphertext, b"")) == data
        back = stub.Decrypt(pb.DecryptRequest(algorithm=pb.CIPHER_ALGORITHM_AES_256_GCM, key=pb.KeySpec(raw=key),
                                              nonce=sealed.nonce, ciphertext=sealed.ciphertext,
                                              decompress=pb.ChainedCompression(format=fmt)), timeout=30)
        assert back.plaintext == data
