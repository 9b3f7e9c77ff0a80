"""Round trips between the service and Python's zlib/gzip, in both directions."""
import concurrent.futures as cf
import gzip
import os
import struct
import zlib

import pytest

from agtest import (DEFAULT_LEVEL, DEFAULT_MAX_REQUEST, DEFLATE, FORMATS, GZIP, KiB, MiB, ZLIB, call,
                    check_stats, gzip_with_filename, pb, py_compress, py_decompress_strict, stored_deflate,
                    text_bytes, wrap)

# Payloads are made once per session. Random ones come from os.urandom.
_RANDOM_4M = os.urandom(DEFAULT_MAX_REQUEST)
_TEXT_4M = text_bytes(DEFAULT_MAX_REQUEST, seed=7)

PAYLOADS = {
    "empty": b"",
    "1B-random": _RANDOM_4M[:1],
    "1B-text": b"T",
    "4KiB-random": _RANDOM_4M[:4 * KiB],
    "4KiB-text": _TEXT_4M[:4 * KiB],
    "1MiB-random": _RANDOM_4M[:MiB],
    "1MiB-text": _TEXT_4M[:MiB],
}
MAX_PAYLOADS = {"4MiB-random": _RANDOM_4M, "4MiB-text": _TEXT_4M}

# None = field unset (server default).
LEVELS = [0, 1, 3, 6, 9, None, -1]


def _level_id(level):
    return "unset" if level is None else f"L{level}"


def _compress_req(fmt, data, level):
    if level is None:
        return pb.CompressRequest(format=fmt, data=data)
    return pb.CompressRequest(format=fmt, data=data, level=level)


def _compress_and_check(stub, fmt, data, level):
    o = call(stub.Compress, _compress_req(fmt, data, level))
    assert o.ok, f"Compress({len(data)} B, level {level}) -> {o.describe()}"
    out = o.response.data
    assert py_decompress_strict(fmt, out) == data, "Python decompressed something else than the input"
    check_stats(o.response.stats, input_bytes=len(data), output_bytes=len(out))
    return out


def _decompress_and_check(stub, fmt, compressed, expected):
    o = call(stub.Decompress, pb.DecompressRequest(format=fmt, data=compressed))
    assert o.ok, f"Decompress({len(compressed)} B -> {len(expected)} B) -> {o.describe()}"
    assert len(o.response.data) == len(expected) and o.response.data == expected, \
        "service decompressed something else than the original"
    check_stats(o.response.stats, input_bytes=len(compressed), output_bytes=len(expected))


@pytest.mark.parametrize("level", LEVELS, ids=_level_id)
@pytest.mark.parametrize("payload", list(PAYLOADS), ids=str)
@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_compress_matrix(stub, fmt, payload, level):
    data = PAYLOADS[payload]
    out = _compress_and_check(stub, fmt, data, level)
    # The service must read back what it wrote.
    _decompress_and_check(stub, fmt, out, data)
    # The level must really be applied: 0 is stored, the others compress text.
    if level == 0 and data:
        assert len(out) >= len(data), f"level 0 (stored) produced {len(out)} B from {len(data)} B"
    if level != 0 and payload.endswith("text") and len(data) >= 4 * KiB:
        assert len(out) < len(data) // 2, f"level {level} produced {len(out)} B from {len(data)} B of text"


@pytest.mark.parametrize("payload", list(MAX_PAYLOADS), ids=str)
@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_compress_max_size(stub, fmt, payload):
    data = MAX_PAYLOADS[payload]
    out = _compress_and_check(stub, fmt, data, 1)
    if payload.endswith("text"):
        _decompress_and_check(stub, fmt, out, data)
    else:
        # Random data does not shrink, so the answer is over the request limit and
        # cannot be sent back; Python checked it above.
        assert len(out) > DEFAULT_MAX_REQUEST


def test_compress_max_size_stored_exceeds_request_limit(stub):
    """Level 0 on 4 MiB of random data answers more than 4 MiB (the compress bound)."""
    out = _compress_and_check(stub, GZIP, _RANDOM_4M, 0)
    assert len(out) > DEFAULT_MAX_REQUEST


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_default_level_is_6(stub, fmt):
    data = _TEXT_4M[:64 * KiB]
    unset = call(stub.Compress, _compress_req(fmt, data, None))
    minus1 = call(stub.Compress, _compress_req(fmt, data, -1))
    six = call(stub.Compress, _compress_req(fmt, data, DEFAULT_LEVEL))
    one = call(stub.Compress, _compress_req(fmt, data, 1))
    for o in (unset, minus1, six, one):
        assert o.ok, o.describe()
    assert unset.response.data == six.response.data, "unset level does not compress like level 6"
    assert minus1.response.data == six.response.data, "level -1 does not compress like level 6"
    assert one.response.data != six.response.data, "level 1 and level 6 give identical output; is level ignored?"


# -------------------------------------------------------------------------------------
# Python compresses, the service decompresses.

SOURCES = {
    "empty": b"",
    "1B": b"\x00",
    "4KiB-text": _TEXT_4M[:4 * KiB],
    "4KiB-random": _RANDOM_4M[:4 * KiB],
    "1MiB-text": _TEXT_4M[:MiB],
    "1MiB-random": _RANDOM_4M[:MiB],
}


def _zlib_strategy(data, strategy, wbits, level=6):
    co = zlib.compressobj(level, zlib.DEFLATED, wbits, 8, strategy)
    return co.compress(data) + co.flush()


def _flushed_stream(data, wbits, mode):
    """A stream with sync/full flushes (empty stored blocks) between chunks."""
    co = zlib.compressobj(6, zlib.DEFLATED, wbits)
    out = bytearray()
    step = max(1, len(data) // 5)
    for i in range(0, len(data), step):
        out += co.compress(data[i:i + step]) + co.flush(mode)
    return bytes(out + co.flush())


def _gzip_all_header_fields(data):
    """gzip member with FTEXT, FEXTRA, FNAME, FCOMMENT and a correct FHCRC."""
    head = b"\x1f\x8b\x08\x1f" + struct.pack("<I", 1700000000) + b"\x02\x03"
    head += struct.pack("<H", 8) + b"AG\x04\x00abcd" + b"file.txt\x00" + b"a comment\x00"
    head += struct.pack("<H", zlib.crc32(head) & 0xFFFF)
    return head + py_compress(DEFLATE, data, 6) + struct.pack("<II", zlib.crc32(data), len(data))


PRODUCERS = {
    # ZLIB
    "zlib.compress-L0": (ZLIB, lambda d: zlib.compress(d, 0)),
    "zlib.compress-L1": (ZLIB, lambda d: zlib.compress(d, 1)),
    "zlib.compress-L6": (ZLIB, lambda d: zlib.compress(d, 6)),
    "zlib.compress-L9": (ZLIB, lambda d: zlib.compress(d, 9)),
    "zlib.compress-default": (ZLIB, lambda d: zlib.compress(d)),
    "zlib-wbits9": (ZLIB, lambda d: zlib.compress(d, 6, 9)),
    "zlib-syncflush": (ZLIB, lambda d: _flushed_stream(d, 15, zlib.Z_SYNC_FLUSH)),
    # raw DEFLATE
    "raw-L0": (DEFLATE, lambda d: py_compress(DEFLATE, d, 0)),
    "raw-L1": (DEFLATE, lambda d: py_compress(DEFLATE, d, 1)),
    "raw-L6": (DEFLATE, lambda d: py_compress(DEFLATE, d, 6)),
    "raw-L9": (DEFLATE, lambda d: py_compress(DEFLATE, d, 9)),
    "raw-huffman-only": (DEFLATE, lambda d: _zlib_strategy(d, zlib.Z_HUFFMAN_ONLY, -15)),
    "raw-rle": (DEFLATE, lambda d: _zlib_strategy(d, zlib.Z_RLE, -15)),
    "raw-fixed": (DEFLATE, lambda d: _zlib_strategy(d, zlib.Z_FIXED, -15)),
    "raw-fullflush": (DEFLATE, lambda d: _flushed_stream(d, -15, zlib.Z_FULL_FLUSH)),
    "raw-stored-handmade": (DEFLATE, stored_deflate),
    # GZIP
    "gzip.compress-L1": (GZIP, lambda d: gzip.compress(d, 1)),
    "gzip.compress-L9": (GZIP, lambda d: gzip.compress(d, 9)),
    "gzip.compress-default": (GZIP, lambda d: gzip.compress(d)),
    "gzip-filename-header": (GZIP, gzip_with_filename),
    "gzip-all-header-fields": (GZIP, _gzip_all_header_fields),
    "gzip-zlib-wbits31": (GZIP, lambda d: py_compress(GZIP, d, 6)),
    "gzip-multi-member": (GZIP, lambda d: gzip.compress(d[:len(d) // 3]) + gzip.compress(d[len(d) // 3:])),
}


@pytest.mark.parametrize("source", list(SOURCES), ids=str)
@pytest.mark.parametrize("producer", list(PRODUCERS), ids=str)
def test_decompress_python_output(stub, producer, source):
    fmt, make = PRODUCERS[producer]
    data = SOURCES[source]
    compressed = make(data)
    _decompress_and_check(stub, fmt, compressed, data)


def test_decompress_multi_member_three_members(stub):
    parts = [b"first member\n", b"", _TEXT_4M[:100 * KiB]]
    blob = b"".join(gzip.compress(p) for p in parts) + gzip_with_filename(b"last")
    _decompress_and_check(stub, GZIP, blob, b"".join(parts) + b"last")


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_decompress_max_size_output(stub, fmt):
    """Python compresses 4 MiB of text; the service inflates it to exactly the output cap.
    (4 MiB of random data does not fit in a request once compressed; see the next test.)"""
    data = _TEXT_4M
    _decompress_and_check(stub, fmt, py_compress(fmt, data, 6), data)


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_decompress_request_of_exactly_max_bytes(stub, fmt):
    """A compressed payload of exactly 4 MiB (stored blocks) is accepted."""
    overhead = {DEFLATE: 0, ZLIB: 6, GZIP: 18}[fmt]
    blocks = 64  # 64 stored blocks of at most 65535 bytes hold just under 4 MiB
    data = _RANDOM_4M[:DEFAULT_MAX_REQUEST - overhead - 5 * blocks]
    compressed = wrap(fmt, stored_deflate(data), original=data)
    assert len(compressed) == DEFAULT_MAX_REQUEST
    _decompress_and_check(stub, fmt, compressed, data)


# -------------------------------------------------------------------------------------
# Concurrency: answers must not be mixed up between calls.


def test_concurrent_round_trips_do_not_mix(stub):
    inputs = [text_bytes(8 * KiB + i * 997, seed=1000 + i) + os.urandom(i * 31) for i in range(48)]
    formats = [list(FORMATS.values())[i % 3] for i in range(len(inputs))]

    def one(i):
        fmt, data = formats[i], inputs[i]
        c = call(stub.Compress, _compress_req(fmt, data, [None, 0, 1, 3, 6, 9][i % 6]))
        assert c.ok, f"call {i}: Compress -> {c.describe()}"
        assert py_decompress_strict(fmt, c.response.data) == data, f"call {i}: got another call's data"
        d = call(stub.Decompress, pb.DecompressRequest(format=fmt, data=c.response.data))
        assert d.ok, f"call {i}: Decompress -> {d.describe()}"
        assert d.response.data == data, f"call {i}: Decompress returned another call's data"

    with cf.ThreadPoolExecutor(max_workers=16) as ex:
        for f in [ex.submit(one, i) for i in range(len(inputs))]:
            f.result()
