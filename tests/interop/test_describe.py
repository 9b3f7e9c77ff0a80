"""DescribeDevice: the device, its queues and engines, capabilities and limits."""
import gzip
import os
import re

import grpc
import pytest

from agtest import (DEFAULT_LEVEL, DEFAULT_MAX_DECOMPRESSED, DEFAULT_MAX_REQUEST, FORMATS, GZIP, KiB, MiB, ZLIB,
                    call, expect_error, pb, py_compress, text_bytes)

COMPRESS = pb.OPERATION_COMPRESS
DECOMPRESS = pb.OPERATION_DECOMPRESS

# Flags for a server whose every limit differs from the defaults.
CUSTOM = {
    "--queues": 3,
    "--engines": 3,
    "--sq-entries": 64,
    "--pool-mib": 32,
    "--max-request-bytes": 1 * MiB,
    "--max-decompressed-bytes": 2 * MiB,
    "--max-queued-jobs": 77,
    "--in-flight-per-queue": 3,
    "--max-batch": 5,
    "--default-deadline-ms": 2500,
    "--engine-cap-mbps": 250,
}


def _describe(stub):
    o = call(stub.DescribeDevice, pb.DescribeDeviceRequest(), timeout=30)
    assert o.ok, f"DescribeDevice -> {o.describe()}"
    return o.response


@pytest.fixture(scope="module")
def custom(start_module_server):
    flags = [str(x) for kv in CUSTOM.items() for x in kv]
    return start_module_server(*flags, label="custom")


def test_device(stub):
    r = _describe(stub)
    assert r.device.name
    assert r.device.mode == "embedded"
    assert re.fullmatch(r"\d+\.\d+", r.device.abi_version), r.device.abi_version
    assert r.device.healthy


def test_default_queues_and_engines(stub):
    r = _describe(stub)
    assert len(r.queues) >= 2, f"{len(r.queues)} queues"
    assert sorted(q.id for q in r.queues) == list(range(len(r.queues)))
    for q in r.queues:
        assert q.state == "running", q
        assert q.sq_entries > 0 and q.cq_entries > 0 and q.data_pool_bytes > 0 and q.weight > 0, q
    assert len(r.engines) >= 1
    assert sorted(e.id for e in r.engines) == list(range(len(r.engines)))
    for e in r.engines:
        assert e.throughput_cap_mbps == 0, "no --engine-cap-mbps was given"


def test_capabilities(stub):
    r = _describe(stub)
    caps = {(c.operation, c.format, c.cipher, c.digest): c for c in r.capabilities}
    assert len(caps) == len(r.capabilities), "duplicate capabilities"
    for name, fmt in FORMATS.items():
        assert (COMPRESS, fmt, 0, 0) in caps, f"no COMPRESS capability for {name}"
        assert (DECOMPRESS, fmt, 0, 0) in caps, f"no DECOMPRESS capability for {name}"
        c = caps[(COMPRESS, fmt, 0, 0)]
        assert (c.min_level, c.max_level, c.default_level) == (0, 9, DEFAULT_LEVEL), c
        assert c.engines, c
        assert caps[(DECOMPRESS, fmt, 0, 0)].engines
    for c in r.capabilities:
        assert c.operation != pb.OPERATION_UNSPECIFIED, c
        # Each capability names exactly one algorithm: a format, a cipher or a digest.
        named = [x for x in (c.format, c.cipher, c.digest) if x != 0]
        assert len(named) == 1, c
        if c.operation in (pb.OPERATION_ENCRYPT, pb.OPERATION_DECRYPT):
            assert c.cipher != 0, c
        elif c.operation == pb.OPERATION_DIGEST:
            assert c.digest != 0, c
        else:
            assert c.format != 0, c
    ciphers = {c.cipher for c in r.capabilities if c.operation == pb.OPERATION_ENCRYPT}
    assert ciphers == {pb.CIPHER_ALGORITHM_AES_128_GCM, pb.CIPHER_ALGORITHM_AES_256_GCM,
                       pb.CIPHER_ALGORITHM_CHACHA20_POLY1305}
    assert len({c.digest for c in r.capabilities if c.operation == pb.OPERATION_DIGEST}) == 8


def _engine_for_level(spec: str, level: int) -> str:
    """Reads "zlib(0) isal-igzip(1-3) libdeflate(4-9)"."""
    for name, lo, hi in re.findall(r"([\w-]+)\((\d+)(?:-(\d+))?\)", spec):
        if int(lo) <= level <= int(hi or lo):
            return name
    raise AssertionError(f"level {level} is not covered by {spec!r}")


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_capability_engines_match_job_stats(stub, fmt):
    caps = {(c.operation, c.format, c.cipher, c.digest): c for c in _describe(stub).capabilities}
    spec = caps[(COMPRESS, fmt, 0, 0)].engines
    data = text_bytes(16 * KiB)
    for level in range(0, 10):
        o = call(stub.Compress, pb.CompressRequest(format=fmt, data=data, level=level))
        assert o.ok, o.describe()
        assert o.response.stats.engine == _engine_for_level(spec, level), \
            f"level {level}: stats.engine {o.response.stats.engine!r}, capability says {spec!r}"
    d = call(stub.Decompress, pb.DecompressRequest(format=fmt, data=py_compress(fmt, data)))
    assert d.ok, d.describe()
    assert d.response.stats.engine in caps[(DECOMPRESS, fmt, 0, 0)].engines


def test_default_limits(stub):
    lim = _describe(stub).limits
    assert lim.max_request_bytes == DEFAULT_MAX_REQUEST
    assert lim.max_decompressed_bytes == DEFAULT_MAX_DECOMPRESSED
    assert lim.max_queued_jobs == 1024
    assert lim.in_flight_per_queue == 8
    assert lim.max_batch == 16
    assert lim.default_deadline_ms == 30000
    assert lim.max_response_bytes >= lim.max_request_bytes


def test_max_response_bytes_covers_worst_case(stub):
    """The advertised response limit holds the largest possible Compress answer."""
    lim = _describe(stub).limits
    data = os.urandom(lim.max_request_bytes)
    for fmt in FORMATS.values():
        o = call(stub.Compress, pb.CompressRequest(format=fmt, data=data, level=0))
        assert o.ok, o.describe()
        assert len(data) < len(o.response.data) <= lim.max_response_bytes


# ---------------------------------------------------------------------------------------
# A server with every limit set by flags


def test_custom_queues_and_engines(custom):
    r = _describe(custom.stub())
    assert len(r.queues) == CUSTOM["--queues"]
    assert sorted(q.id for q in r.queues) == list(range(CUSTOM["--queues"]))
    for q in r.queues:
        assert q.sq_entries == CUSTOM["--sq-entries"], q
        assert q.data_pool_bytes == CUSTOM["--pool-mib"] * MiB, q
        assert q.state == "running", q
    assert len(r.engines) == CUSTOM["--engines"]
    for e in r.engines:
        assert e.throughput_cap_mbps == pytest.approx(CUSTOM["--engine-cap-mbps"]), e
    assert r.device.healthy


@pytest.mark.parametrize("field,flag", [
    ("max_request_bytes", "--max-request-bytes"),
    ("max_decompressed_bytes", "--max-decompressed-bytes"),
    ("max_queued_jobs", "--max-queued-jobs"),
    ("in_flight_per_queue", "--in-flight-per-queue"),
    ("max_batch", "--max-batch"),
    ("default_deadline_ms", "--default-deadline-ms"),
])
def test_custom_limits(custom, field, flag):
    lim = _describe(custom.stub()).limits
    assert getattr(lim, field) == CUSTOM[flag], f"limits.{field} = {getattr(lim, field)}, flag {flag} {CUSTOM[flag]}"


def test_custom_limits_are_enforced(custom):
    stub = custom.stub()
    max_req, max_out = CUSTOM["--max-request-bytes"], CUSTOM["--max-decompressed-bytes"]
    ok = call(stub.Compress, pb.CompressRequest(format=GZIP, data=bytes(max_req)))
    assert ok.ok, f"payload of exactly --max-request-bytes -> {ok.describe()}"
    over = call(stub.Compress, pb.CompressRequest(format=GZIP, data=bytes(max_req + 1)))
    expect_error(over, grpc.StatusCode.RESOURCE_EXHAUSTED, what="payload of --max-request-bytes + 1")

    exact = call(stub.Decompress, pb.DecompressRequest(format=ZLIB, data=py_compress(ZLIB, bytes(max_out), 9)))
    assert exact.ok and len(exact.response.data) == max_out, exact.describe()
    bomb = call(stub.Decompress, pb.DecompressRequest(format=ZLIB, data=py_compress(ZLIB, bytes(max_out + 1), 9)))
    expect_error(bomb, grpc.StatusCode.RESOURCE_EXHAUSTED, what="output of --max-decompressed-bytes + 1")


def test_counters_follow_traffic(start_server):
    srv = start_server("--queues", 2, "--engines", 2, label="counters")
    stub = srv.stub()
    before = _describe(stub)
    assert sum(q.completed for q in before.queues) == 0 and sum(e.jobs for e in before.engines) == 0
    data = text_bytes(32 * KiB)
    n = 25
    for i in range(n):
        o = call(stub.Compress, pb.CompressRequest(format=GZIP, data=data))
        assert o.ok and gzip.decompress(o.response.data) == data, o.describe()
    after = _describe(stub)
    assert sum(q.completed for q in after.queues) == n, [q.completed for q in after.queues]
    assert sum(e.jobs for e in after.engines) == n, [e.jobs for e in after.engines]
    assert sum(e.busy_ns for e in after.engines) > 0
    assert all(q.in_flight == 0 for q in after.queues), [q.in_flight for q in after.queues]
