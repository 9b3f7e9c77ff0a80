"""The pipelined Submit stream: ids, per-item status, completion order, back-pressure."""
import gzip
import os
import threading
import time
import zlib

import grpc
import pytest

from agtest import (DEFLATE, FORMATS, FORMAT_NAMES, GZIP, KiB, MiB, REJECTION_REASON, ZLIB, Tenant, bearer, call,
                    new_key, pb, py_compress, py_decompress_strict, text_bytes, wait_device_idle, write_tenants)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DATA_LOSS = grpc.StatusCode.DATA_LOSS
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


def _submit(stub, items, timeout=120, metadata=None):
    """Runs a Submit stream; returns (responses in arrival order, arrival times)."""
    start = time.monotonic()
    out, at = [], []
    for r in stub.Submit(iter(items), timeout=timeout, metadata=metadata):
        out.append(r)
        at.append(time.monotonic() - start)
    return out, at


def _compress_item(i, fmt, data, level=None):
    req = pb.CompressRequest(format=fmt, data=data) if level is None else \
        pb.CompressRequest(format=fmt, data=data, level=level)
    return pb.SubmitRequest(id=i, compress=req)


def _check_item(r, expected):
    """expected: ("compress", fmt, original) or ("decompress", fmt, original)."""
    kind, fmt, original = expected
    assert r.code == 0, f"item {r.id!r}: code {r.code} {r.message!r}"
    assert r.retry_after_ms == 0, f"item {r.id!r}: retry_after_ms {r.retry_after_ms} on a success"
    assert r.WhichOneof("result") == kind, f"item {r.id!r}: result is {r.WhichOneof('result')}, expected {kind}"
    if kind == "compress":
        out = r.compress.data
        assert py_decompress_strict(fmt, out) == original, f"item {r.id!r}: Python decompressed something else"
        if fmt == GZIP:
            assert gzip.decompress(out) == original
        elif fmt == ZLIB:
            assert zlib.decompress(out) == original
        stats = r.compress.stats
    else:
        assert r.decompress.data == original, f"item {r.id!r}: decompressed something else"
        out = r.decompress.data
        stats = r.decompress.stats
    assert stats.input_bytes > 0 or not original
    assert stats.output_bytes == len(out), f"item {r.id!r}: stats.output_bytes {stats.output_bytes} != {len(out)}"
    assert stats.total_ns > 0


def test_round_trip_of_many_jobs(stub):
    items, expected = [], {}
    for i in range(240):
        fmt = list(FORMATS.values())[i % 3]
        data = text_bytes(1 + (i * 7919) % (96 * KiB), seed=i) if i % 4 else os.urandom(1 + (i * 131) % (32 * KiB))
        iid = f"job-{i:03d}-{FORMAT_NAMES[fmt]}"
        if i % 5 == 4:
            items.append(pb.SubmitRequest(id=iid, decompress=pb.DecompressRequest(format=fmt,
                                                                                 data=py_compress(fmt, data, 6))))
            expected[iid] = ("decompress", fmt, data)
        else:
            items.append(_compress_item(iid, fmt, data, level=i % 10))
            expected[iid] = ("compress", fmt, data)
    results, _ = _submit(stub, items)
    ids = [r.id for r in results]
    assert len(ids) == len(items), f"{len(items)} jobs submitted, {len(ids)} results"
    assert sorted(ids) == sorted(expected), "the ids that came back are not the ids that were sent"
    for r in results:
        _check_item(r, expected[r.id])


def test_empty_stream(stub):
    results, _ = _submit(stub, [])
    assert results == []


def test_ids_need_not_be_unique(stub):
    data = text_bytes(4 * KiB)
    results, _ = _submit(stub, [_compress_item("same", GZIP, data) for _ in range(5)] +
                         [_compress_item("", GZIP, data)])
    assert sorted(r.id for r in results) == ["", "same", "same", "same", "same", "same"]
    for r in results:
        _check_item(r, ("compress", GZIP, data))


def test_failing_items_get_their_own_status(stub):
    good = {f"g{i}": text_bytes(8 * KiB, seed=100 + i) for i in range(12)}
    compressed_ok = py_compress(ZLIB, good["g0"])
    items = [_compress_item(k, GZIP, v) for k, v in good.items()]
    bad = {
        "corrupt-gzip": (pb.SubmitRequest(id="corrupt-gzip", decompress=pb.DecompressRequest(
            format=GZIP, data=b"\x1f\x8b\x08\x00" + b"not really gzip" * 10)), INVALID),
        "bad-zlib-checksum": (pb.SubmitRequest(id="bad-zlib-checksum", decompress=pb.DecompressRequest(
            format=ZLIB, data=compressed_ok[:-1] + bytes([compressed_ok[-1] ^ 1]))), DATA_LOSS),
        "no-job": (pb.SubmitRequest(id="no-job"), INVALID),
        "no-format": (pb.SubmitRequest(id="no-format", compress=pb.CompressRequest(data=b"abc")), INVALID),
        "bad-level": (pb.SubmitRequest(id="bad-level", compress=pb.CompressRequest(format=GZIP, data=b"abc",
                                                                                   level=12)), INVALID),
        "bomb": (pb.SubmitRequest(id="bomb", decompress=pb.DecompressRequest(
            format=DEFLATE, data=py_compress(DEFLATE, bytes(MiB), 9), max_output_bytes=1000)), EXHAUSTED),
    }
    # Interleave the bad items between the good ones.
    for n, (req, _) in enumerate(bad.values()):
        items.insert(2 * n + 1, req)
    results, _ = _submit(stub, items)
    assert sorted(r.id for r in results) == sorted(list(good) + list(bad))
    for r in results:
        if r.id in good:
            _check_item(r, ("compress", GZIP, good[r.id]))
        else:
            code = bad[r.id][1]
            assert r.code == code.value[0], \
                f"item {r.id!r}: expected {code.name} ({code.value[0]}), got {r.code} {r.message!r}"
            assert r.message, f"item {r.id!r} failed without a message"
            assert r.WhichOneof("result") is None, f"failed item {r.id!r} carries a result"
            assert r.retry_after_ms == 0, f"item {r.id!r}: retry_after_ms {r.retry_after_ms} on a non-admission error"
            # "as a unary call would have returned it"
            req = bad[r.id][0]
            kind = req.WhichOneof("job")
            if kind is not None:
                method = stub.Compress if kind == "compress" else stub.Decompress
                unary = call(method, getattr(req, kind))
                assert (unary.code.value[0], unary.details) == (r.code, r.message), \
                    f"item {r.id!r}: stream says {r.code} {r.message!r}, unary call says {unary.describe()}"


def test_results_come_in_completion_order(start_server):
    """Two queues and two engines at 4 MB/s: a 2 MiB job (about 0.5 s) and a 1 KiB job
    sent 0.1 s later run side by side, and the small result must not wait behind
    the big one."""
    srv = start_server("--queues", 2, "--engines", 2, "--engine-cap-mbps", 4, label="order")
    stub = srv.stub()
    big = os.urandom(2 * MiB)
    small = text_bytes(KiB)
    for attempt in range(3):
        def items():
            yield _compress_item("big", GZIP, big, level=1)
            time.sleep(0.1)
            yield _compress_item("small", GZIP, small, level=1)

        start = time.monotonic()
        out, at = [], []
        for r in stub.Submit(items(), timeout=60):
            out.append(r)
            at.append(time.monotonic() - start)
        assert sorted(r.id for r in out) == ["big", "small"]
        by_id = {r.id: r for r in out}
        _check_item(by_id["big"], ("compress", GZIP, big))
        _check_item(by_id["small"], ("compress", GZIP, small))
        assert by_id["big"].compress.stats.device_ns >= 400_000_000, \
            f"the 2 MiB job took only {by_id['big'].compress.stats.device_ns} ns; is the cap applied?"
        assert [r.id for r in out] == ["small", "big"], \
            f"attempt {attempt}: results came as {[r.id for r in out]} at {[round(t, 3) for t in at]} s " \
            "(expected the small job first: results are in completion order)"


BP = Tenant("bp", [new_key("bp")], limits={"max_queued_jobs": 2})
SMALLPAY = Tenant("smallpay", [new_key("smallpay")], limits={"max_payload_bytes": 100_000})
RATE = 200_000
RATED = Tenant("rated", [new_key("rated")], limits={"max_bytes_per_second": RATE, "max_payload_bytes": 64 * KiB})


@pytest.fixture(scope="module")
def tenants_server(start_module_server, tmp_path_factory):
    path = write_tenants(str(tmp_path_factory.mktemp("tenants") / "tenants.yaml"), [BP, SMALLPAY, RATED])
    # 128 KiB at 8 MB/s is about 16 ms of device time.
    return start_module_server("--tenants", path, "--queues", 1, "--engines", 1, "--in-flight-per-queue", 1,
                               "--engine-cap-mbps", 8, label="tenants")


def test_back_pressure_instead_of_rejection(tenants_server):
    """30 jobs on one stream against max_queued_jobs 2: the stream is slowed, not
    failed. Meanwhile a unary call of the same tenant sees the queue full, which shows
    the limit was in force while the stream ran."""
    stub = tenants_server.stub()
    wait_device_idle(stub, BP.md)
    payloads = {f"bp-{i}": os.urandom(128 * KiB) for i in range(30)}
    probes = []
    done = threading.Event()

    def probe():
        s = tenants_server.new_stub()
        while not done.is_set():
            probes.append(call(s.Compress, pb.CompressRequest(format=GZIP, data=b"probe", level=1), timeout=60,
                               metadata=BP.md))
            time.sleep(0.02)

    th = threading.Thread(target=probe)
    th.start()
    try:
        results, at = _submit(stub, [_compress_item(k, GZIP, v, level=1) for k, v in payloads.items()],
                              metadata=BP.md)
    finally:
        done.set()
        th.join(60)
    assert sorted(r.id for r in results) == sorted(payloads)
    rejected = [(r.id, r.code, r.message, r.retry_after_ms) for r in results if r.code != 0]
    assert not rejected, f"{len(rejected)} of 30 stream items failed instead of waiting: {rejected[:5]}"
    for r in results:
        _check_item(r, ("compress", GZIP, payloads[r.id]))
    total_device_s = sum(r.compress.stats.device_ns for r in results) / 1e9
    assert total_device_s > 0.3, f"30 x 128 KiB at 8 MB/s charged only {total_device_s:.2f} s of device time"
    assert at[-1] >= total_device_s * 0.8, f"the stream finished in {at[-1]:.2f} s, faster than the device allows"
    full = [o for o in probes if not o.ok]
    for o in full:
        assert o.code == EXHAUSTED and o.trailing.get(REJECTION_REASON) == "tenant_queue_full", o.describe()
    assert full, f"{len(probes)} unary probes during the stream were all admitted; the queue limit did not bind"


def test_item_over_tenant_payload_limit_fails_alone(tenants_server):
    stub = tenants_server.stub()
    limit = SMALLPAY.limits["max_payload_bytes"]
    big = os.urandom(limit + 1)
    fine = {f"ok{i}": text_bytes(10 * KiB, seed=i) for i in range(5)}
    items = [_compress_item(k, GZIP, v) for k, v in fine.items()]
    items.insert(2, _compress_item("too-big", GZIP, big))
    results, _ = _submit(stub, items, metadata=SMALLPAY.md)
    assert sorted(r.id for r in results) == sorted(list(fine) + ["too-big"])
    for r in results:
        if r.id == "too-big":
            assert r.code == EXHAUSTED.value[0], f"too-big: code {r.code} {r.message!r}"
            assert r.retry_after_ms == 0, f"a payload over the limit got a retry hint of {r.retry_after_ms} ms"
        else:
            _check_item(r, ("compress", GZIP, fine[r.id]))


def test_rate_cap_applies_to_streams(tenants_server):
    """A tenant's max_bytes_per_second holds for Submit as for unary calls: a stream
    cannot get more than the one-second burst plus the rate. (Items over the rate may
    wait or come back RESOURCE_EXHAUSTED with a retry hint; either way the bytes that
    ran are bounded.)"""
    stub = tenants_server.stub()
    job = os.urandom(16 * KiB)
    n = 40
    results, at = _submit(stub, [_compress_item(f"r{i}", GZIP, job, level=1) for i in range(n)], metadata=RATED.md)
    elapsed = at[-1]
    assert sorted(r.id for r in results) == sorted(f"r{i}" for i in range(n))
    ran = 0
    for r in results:
        if r.code == 0:
            _check_item(r, ("compress", GZIP, job))
            ran += len(job)
        else:
            assert r.code == EXHAUSTED.value[0] and r.retry_after_ms > 0, \
                f"item {r.id}: {r.code} {r.message!r} retry_after_ms={r.retry_after_ms}"
    allowed = RATE + RATE * elapsed + len(job)
    assert ran <= allowed, \
        f"a Submit stream of a tenant capped at {RATE} B/s (burst {RATE} B) ran {ran} B in {elapsed:.2f} s; " \
        f"at most {allowed:.0f} B were allowed"
    # Unary calls right after see the cap (the stream did not leave the bucket full).
    o = call(stub.Compress, pb.CompressRequest(format=GZIP, data=job, level=1), metadata=RATED.md)
    assert o.ok or o.trailing.get(REJECTION_REASON) == "rate_limited", o.describe()


@pytest.mark.parametrize("md", [None, bearer("not-a-key"), (("authorization", "Bearer"),)],
                         ids=["missing", "unknown", "malformed"])
def test_unauthenticated_submit(tenants_server, md):
    stub = tenants_server.stub()
    items = [_compress_item("x", GZIP, b"hello")]
    with pytest.raises(grpc.RpcError) as e:
        _submit(stub, items, metadata=md, timeout=30)
    assert e.value.code() == UNAUTH, f"Submit without valid credentials -> {e.value.code()} {e.value.details()!r}"
    # And with a key it works.
    results, _ = _submit(stub, items, metadata=BP.md, timeout=30)
    assert [r.code for r in results] == [0]
