"""Bad input: exact status codes, a message, no retry hint, and the server keeps serving."""
import concurrent.futures as cf
import gzip
import os
import random
import struct
import zlib

import grpc
import pytest

from agtest import (DEFAULT_MAX_DECOMPRESSED, DEFAULT_MAX_REQUEST, DEFLATE, FORMAT_NAMES, FORMATS, GZIP, GZIP_HEADER,
                    KiB, MiB, ZLIB, assert_serves, call, expect_error, fixed_block_distance_too_far, pb,
                    py_compress, py_rejects, text_bytes, wrap, zero_bomb_raw)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DATA_LOSS = grpc.StatusCode.DATA_LOSS
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

TEXT = text_bytes(20 * KiB, seed=3)
RAW = py_compress(DEFLATE, TEXT)
ZLB = py_compress(ZLIB, TEXT)
GZ = gzip.compress(TEXT)
GOOD = {DEFLATE: RAW, ZLIB: ZLB, GZIP: GZ}


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0xFF
    return bytes(b)


def _zlib_header_fcheck_broken() -> bytes:
    # CMF 0x78 (deflate, 32K window) with an FLG whose FCHECK does not make the
    # 16-bit header a multiple of 31.
    assert (0x78 * 256 + 0x9D) % 31 != 0
    return b"\x78\x9d" + ZLB[2:]


def _zlib_with_dictionary() -> bytes:
    co = zlib.compressobj(6, zlib.DEFLATED, 15, zdict=b"queue engine descriptor")
    return co.compress(TEXT) + co.flush()


def _gzip_header_flags(flags: int, extra: bytes = b"") -> bytes:
    return b"\x1f\x8b\x08" + bytes([flags]) + b"\x00\x00\x00\x00\x00\xff" + extra + RAW + \
        struct.pack("<II", zlib.crc32(TEXT), len(TEXT))


def _corrupt_middle(fmt: int) -> bytes:
    """GOOD[fmt] with one byte from the middle on inverted, at the first place where
    that makes the stream invalid for zlib (some flips still decode)."""
    good = GOOD[fmt]
    for at in range(len(good) // 2, len(good) - 8):
        bad = _flip(good, at)
        if py_rejects(fmt, bad) and (fmt == DEFLATE or _reference_error(fmt, bad) != "checksum"):
            return bad
    raise AssertionError("no invalid flip found")


def _reference_error(fmt: int, data: bytes) -> str:
    try:
        zlib.decompress(data, {ZLIB: 15, GZIP: 31}[fmt])
    except zlib.error as e:
        return "checksum" if "check" in str(e) else "structure"
    return "none"


_RNG = random.Random(1234)
_JUNK = bytes(_RNG.getrandbits(8) for _ in range(4096))

# (id, format, data, expected code)
CORRUPT = []
for _name, _fmt in FORMATS.items():
    _good = GOOD[_fmt]
    CORRUPT += [
        (f"{_name}-empty", _fmt, b"", INVALID),
        (f"{_name}-one-zero-byte", _fmt, b"\x00", INVALID),
        (f"{_name}-truncated-last-byte", _fmt, _good[:-1], INVALID),
        (f"{_name}-truncated-half", _fmt, _good[:len(_good) // 2], INVALID),
        (f"{_name}-truncated-to-3-bytes", _fmt, _good[:3], INVALID),
        (f"{_name}-trailing-garbage-1", _fmt, _good + b"G", INVALID),
        (f"{_name}-trailing-garbage-4", _fmt, _good + b"GARB", INVALID),
        (f"{_name}-trailing-garbage-8", _fmt, _good + b"GARBAGE!", INVALID),
        (f"{_name}-all-ff", _fmt, b"\xff" * 64, INVALID),
        (f"{_name}-random-junk", _fmt, _JUNK, INVALID),
        (f"{_name}-plain-text", _fmt, b"this is not compressed at all, just text\n" * 10, INVALID),
    ]
CORRUPT += [
    # Zero padding after a gzip member is tolerated by gzip(1) and Python, so only the
    # formats without members are checked for it.
    ("deflate-trailing-zeros-16", DEFLATE, RAW + bytes(16), INVALID),
    ("zlib-trailing-zeros-16", ZLIB, ZLB + bytes(16), INVALID),
    # raw DEFLATE structure
    ("deflate-reserved-block-type", DEFLATE, b"\x07\x00", INVALID),
    ("deflate-stored-len-nlen-mismatch", DEFLATE, b"\x01\x05\x00\x00\x00hello", INVALID),
    ("deflate-stored-len-past-end", DEFLATE, b"\x01\xff\xff\x00\x00hello", INVALID),
    ("deflate-distance-too-far-back", DEFLATE, fixed_block_distance_too_far(), INVALID),
    ("deflate-corrupt-middle", DEFLATE, _corrupt_middle(DEFLATE), INVALID),
    ("zlib-corrupt-middle", ZLIB, _corrupt_middle(ZLIB), INVALID),
    ("gzip-corrupt-middle", GZIP, _corrupt_middle(GZIP), INVALID),
    # zlib header and trailer
    ("zlib-bad-method", ZLIB, b"\x79\x9c" + ZLB[2:], INVALID),
    ("zlib-bad-header-check", ZLIB, _zlib_header_fcheck_broken(), INVALID),
    ("zlib-needs-dictionary", ZLIB, _zlib_with_dictionary(), INVALID),
    ("zlib-gzip-data", ZLIB, GZ, INVALID),
    ("zlib-adler32-mismatch", ZLIB, ZLB[:-4] + struct.pack(">I", (zlib.adler32(TEXT) + 1) & 0xFFFFFFFF),
     DATA_LOSS),
    ("zlib-adler32-zeroed", ZLIB, ZLB[:-4] + b"\0\0\0\0", DATA_LOSS),
    # gzip header and trailer
    ("gzip-bad-magic", GZIP, b"\x1f\x8c" + GZ[2:], INVALID),
    ("gzip-bad-method", GZIP, GZ[:2] + b"\x07" + GZ[3:], INVALID),
    ("gzip-reserved-flag-bits", GZIP, _gzip_header_flags(0x20), INVALID),
    ("gzip-fextra-past-end", GZIP, b"\x1f\x8b\x08\x04\0\0\0\0\0\xff\xff\xff" + b"x" * 10, INVALID),
    ("gzip-fname-unterminated", GZIP, b"\x1f\x8b\x08\x08\0\0\0\0\0\xff" + b"name-without-end" * 4, INVALID),
    # FHCRC set, but the CRC16 does not match the header: a checksum mismatch.
    ("gzip-header-crc16-mismatch", GZIP, _gzip_header_flags(0x02, b"\x00\x00"), DATA_LOSS),
    ("gzip-zlib-data", GZIP, ZLB, INVALID),
    ("gzip-raw-data", GZIP, RAW, INVALID),
    ("gzip-crc32-mismatch", GZIP, GZ[:-8] + struct.pack("<I", (zlib.crc32(TEXT) + 1) & 0xFFFFFFFF) + GZ[-4:],
     DATA_LOSS),
    ("gzip-isize-mismatch", GZIP, GZ[:-4] + struct.pack("<I", len(TEXT) + 1), DATA_LOSS),
    ("gzip-second-member-truncated", GZIP, GZ + GZ[:len(GZ) // 2], INVALID),
    ("gzip-second-member-header-only", GZIP, GZ + GZIP_HEADER, INVALID),
    ("gzip-second-member-bad-crc", GZIP, GZ + GZ[:-8] + b"\0\0\0\0" + GZ[-4:], DATA_LOSS),
]


@pytest.mark.parametrize("fmt,data,code", [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_corrupt_input(stub, fmt, data, code):
    # The premise: Python's reference decoder refuses this input too.
    assert py_rejects(fmt, data), "test premise broken: Python accepts this input"
    o = call(stub.Decompress, pb.DecompressRequest(format=fmt, data=data))
    expect_error(o, code, what=f"{FORMAT_NAMES[fmt]} input of {len(data)} bytes")
    assert_serves(stub, what="corrupt input")


def test_corrupt_input_concurrently_with_good_calls(stub):
    """A burst of bad calls mixed with good ones: every good call still succeeds, and each
    bad call gets the same status as when it runs alone (the exact statuses are checked
    by test_corrupt_input)."""
    cases = [(c[0], c[1], c[2]) for c in CORRUPT]
    alone = {name: call(stub.Decompress, pb.DecompressRequest(format=fmt, data=data)).code
             for name, fmt, data in cases}

    def bad(i):
        name, fmt, data = cases[i % len(cases)]
        o = call(stub.Decompress, pb.DecompressRequest(format=fmt, data=data))
        assert o.code == alone[name], f"case {name}: alone {alone[name].name}, in the burst {o.describe()}"

    def good(i):
        fmt = list(FORMATS.values())[i % 3]
        o = call(stub.Decompress, pb.DecompressRequest(format=fmt, data=GOOD[fmt]))
        assert o.ok and o.response.data == TEXT, o.describe()

    with cf.ThreadPoolExecutor(max_workers=12) as ex:
        futures = [ex.submit(bad if i % 2 else good, i) for i in range(2 * len(cases))]
        for f in futures:
            f.result()
    assert_serves(stub)


# -------------------------------------------------------------------------------------
# Decompression bombs and output caps


@pytest.fixture(scope="module")
def gib_of_zeros():
    raw, adler, crc = zero_bomb_raw(1 << 30)
    return {
        DEFLATE: raw,
        ZLIB: wrap(ZLIB, raw, adler=adler),
        GZIP: wrap(GZIP, raw, crc=crc, size=1 << 30),
    }


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_decompression_bomb(stub, fmt, gib_of_zeros):
    bomb = gib_of_zeros[fmt]
    assert len(bomb) < DEFAULT_MAX_REQUEST  # it is the output, not the request, that is too big
    o = call(stub.Decompress, pb.DecompressRequest(format=fmt, data=bomb))
    expect_error(o, EXHAUSTED, what="1 GiB decompression bomb")
    assert_serves(stub, what="a decompression bomb")


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_decompression_bomb_with_large_caller_cap_is_clamped(stub, fmt, gib_of_zeros):
    o = call(stub.Decompress, pb.DecompressRequest(format=fmt, data=gib_of_zeros[fmt], max_output_bytes=2 << 30))
    expect_error(o, EXHAUSTED, what="bomb with max_output_bytes = 2 GiB")
    assert_serves(stub, what="a decompression bomb")


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_output_cap_boundary(stub, fmt):
    exact = py_compress(fmt, bytes(DEFAULT_MAX_DECOMPRESSED), 9)
    o = call(stub.Decompress, pb.DecompressRequest(format=fmt, data=exact))
    assert o.ok, f"output of exactly the cap -> {o.describe()}"
    assert o.response.data == bytes(DEFAULT_MAX_DECOMPRESSED)

    over = py_compress(fmt, bytes(DEFAULT_MAX_DECOMPRESSED + 1), 9)
    o = call(stub.Decompress, pb.DecompressRequest(format=fmt, data=over))
    expect_error(o, EXHAUSTED, what="output of cap + 1 byte")
    assert_serves(stub, what="output over the cap")


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_caller_max_output_bytes(stub, fmt):
    compressed = GOOD[fmt]
    for cap in (1, len(TEXT) // 2, len(TEXT) - 1):
        o = call(stub.Decompress, pb.DecompressRequest(format=fmt, data=compressed, max_output_bytes=cap))
        expect_error(o, EXHAUSTED, what=f"max_output_bytes {cap} < real size {len(TEXT)}")
    for cap in (len(TEXT), len(TEXT) + 1, 0):
        o = call(stub.Decompress, pb.DecompressRequest(format=fmt, data=compressed, max_output_bytes=cap))
        assert o.ok, f"max_output_bytes {cap} (real size {len(TEXT)}) -> {o.describe()}"
        assert o.response.data == TEXT
    assert_serves(stub, what="max_output_bytes")


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_caller_max_output_bytes_above_server_limit_is_clamped(stub, fmt):
    over = py_compress(fmt, bytes(DEFAULT_MAX_DECOMPRESSED + 1), 9)
    o = call(stub.Decompress, pb.DecompressRequest(format=fmt, data=over, max_output_bytes=64 * MiB))
    expect_error(o, EXHAUSTED, what="max_output_bytes above the server limit")


# -------------------------------------------------------------------------------------
# Empty payloads (valid)


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_empty_payload(stub, fmt):
    c = call(stub.Compress, pb.CompressRequest(format=fmt, data=b""))
    assert c.ok, f"Compress(empty) -> {c.describe()}"
    assert c.response.data, "Compress(empty) must still produce a valid (non-empty) stream"
    assert zlib.decompressobj({DEFLATE: -15, ZLIB: 15, GZIP: 31}[fmt]).decompress(c.response.data) == b""
    for stream in (c.response.data, py_compress(fmt, b"")):
        d = call(stub.Decompress, pb.DecompressRequest(format=fmt, data=stream))
        assert d.ok, f"Decompress(valid empty stream {stream.hex()}) -> {d.describe()}"
        assert d.response.data == b""


# -------------------------------------------------------------------------------------
# Request size


@pytest.mark.parametrize("size", [DEFAULT_MAX_REQUEST + 1, 5 * MiB], ids=["4MiB+1", "5MiB"])
@pytest.mark.parametrize("method", ["Compress", "Decompress"])
def test_payload_over_max_request(stub, method, size):
    data = bytes(size)
    if method == "Compress":
        o = call(stub.Compress, pb.CompressRequest(format=GZIP, data=data))
    else:
        o = call(stub.Decompress, pb.DecompressRequest(format=GZIP, data=data))
    expect_error(o, EXHAUSTED, what=f"{method} payload of {size} bytes (limit {DEFAULT_MAX_REQUEST})")
    assert_serves(stub, what="an oversized request")


def test_payload_of_exactly_max_request(stub):
    data = os.urandom(DEFAULT_MAX_REQUEST)
    o = call(stub.Compress, pb.CompressRequest(format=ZLIB, data=data, level=1))
    assert o.ok, f"Compress of exactly {DEFAULT_MAX_REQUEST} bytes -> {o.describe()}"
    assert zlib.decompress(o.response.data) == data
    # (Decompress of an exactly-4-MiB payload is in test_roundtrip.py.)


# -------------------------------------------------------------------------------------
# Format and level


@pytest.mark.parametrize("fmt", [pb.COMPRESSION_FORMAT_UNSPECIFIED, 6, 99, 2**31 - 1, -1],
                         ids=["UNSPECIFIED", "6", "99", "int32-max", "-1"])
def test_unknown_format(stub, fmt):
    c = call(stub.Compress, pb.CompressRequest(format=fmt, data=TEXT))
    expect_error(c, INVALID, what=f"Compress with format {fmt}")
    d = call(stub.Decompress, pb.DecompressRequest(format=fmt, data=GZ))
    expect_error(d, INVALID, what=f"Decompress with format {fmt}")
    e = call(stub.Decompress, pb.DecompressRequest(format=fmt, data=b""))
    expect_error(e, INVALID, what=f"Decompress of nothing with format {fmt}")
    assert_serves(stub, what="an unknown format")


@pytest.mark.parametrize("level", [10, 11, 100, -2, -9, 2**31 - 1, -2**31])
@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_level_out_of_range(stub, fmt, level):
    o = call(stub.Compress, pb.CompressRequest(format=fmt, data=TEXT, level=level))
    expect_error(o, INVALID, what=f"level {level}")
    assert_serves(stub, what="a bad level")


def test_level_out_of_range_on_empty_payload(stub):
    o = call(stub.Compress, pb.CompressRequest(format=GZIP, data=b"", level=12))
    expect_error(o, INVALID, what="level 12 with an empty payload")
