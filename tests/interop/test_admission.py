"""Admission control and deadlines, each against its own slow server.

The emulated device is slowed with --engine-cap-mbps: at 1 MB/s a 256 KiB job takes
about 0.26 s and a 2 MiB job about 2.1 s of device time. Bounds are seconds wide so the
tests hold on two busy cores.
"""
import concurrent.futures as cf
import gzip
import os
import threading
import time

import grpc

from agtest import (GZIP, KiB, MiB, RETRY_AFTER, call, expect_error, pb, wait_until_serves)

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED

SLOW = ("--queues", 1, "--engines", 1, "--engine-cap-mbps", 1, "--in-flight-per-queue", 1)
BLOCK = os.urandom(256 * KiB)
BIG = os.urandom(2 * MiB)


def _compress(stub, data, timeout):
    return call(stub.Compress, pb.CompressRequest(format=GZIP, data=data, level=1), timeout=timeout)


def _fire_together(fn, n):
    """Runs fn(i) for i in range(n) on n threads released at the same moment."""
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait(30)
        return fn(i)

    with cf.ThreadPoolExecutor(max_workers=n) as ex:
        return [f.result() for f in [ex.submit(run, i) for i in range(n)]]


def _healthy(stub):
    d = call(stub.DescribeDevice, pb.DescribeDeviceRequest(), timeout=30)
    assert d.ok, f"DescribeDevice -> {d.describe()}"
    assert d.response.device.healthy, f"device reports unhealthy: {d.response.device}"
    assert all(q.state == "running" for q in d.response.queues), [q.state for q in d.response.queues]


def test_queue_full_rejects_with_retry_hint(start_server):
    srv = start_server(*SLOW, "--max-queued-jobs", 2, label="queue-full")
    stub = srv.stub()
    wait_until_serves(stub, what="start-up")  # connects the channel before the burst

    outcomes = _fire_together(lambda i: _compress(stub, BLOCK, timeout=60), 16)

    ok = [o for o in outcomes if o.ok]
    rejected = [o for o in outcomes if not o.ok]
    assert rejected, "16 concurrent 256 KiB calls against 1 running + 2 queued slots: none was rejected"
    assert ok, "every call was rejected; admission let nothing in: " + rejected[0].describe()
    for o in ok:
        assert gzip.decompress(o.response.data) == BLOCK
    for o in rejected:
        expect_error(o, EXHAUSTED, retry_hint=True, what="a call against a full queue")
        hint = o.trailing[RETRY_AFTER]
        assert hint.isdigit() and 0 < int(hint) <= 60_000, f"{RETRY_AFTER} is not a plausible delay: {hint!r}"
    # Admission rejections answer at once instead of waiting for the device.
    slowest_rejection = max(o.elapsed for o in rejected)
    slowest_success = max(o.elapsed for o in ok)
    assert slowest_rejection < slowest_success, \
        f"a rejection took {slowest_rejection:.2f} s, longer than the slowest admitted call ({slowest_success:.2f} s)"
    _healthy(stub)
    wait_until_serves(stub, what="a full queue")


def test_retry_hint_lets_every_call_through(start_server):
    srv = start_server(*SLOW, "--max-queued-jobs", 2, label="retry")
    stub = srv.stub()
    wait_until_serves(stub, what="start-up")
    rejections = []
    lock = threading.Lock()

    def with_retries(i):
        give_up = time.monotonic() + 60
        while True:
            o = _compress(stub, BLOCK, timeout=60)
            if o.ok:
                assert gzip.decompress(o.response.data) == BLOCK
                return o
            expect_error(o, EXHAUSTED, retry_hint=True, what="a call against a full queue")
            with lock:
                rejections.append(o)
            assert time.monotonic() < give_up, f"call {i} still rejected after 60 s of retries"
            time.sleep(int(o.trailing[RETRY_AFTER]) / 1000.0)

    results = _fire_together(with_retries, 8)
    assert len(results) == 8 and all(o.ok for o in results)
    assert rejections, "8 concurrent calls against 3 slots saw no rejection; the queue limit did not apply"


def test_client_deadline_shorter_than_job(start_server):
    srv = start_server(*SLOW, label="client-deadline")
    stub = srv.stub()
    wait_until_serves(stub, what="start-up")

    o = _compress(stub, BIG, timeout=0.5)  # about 2.1 s of device time
    expect_error(o, DEADLINE, what="a 2 MiB job with a 0.5 s client deadline")
    assert o.elapsed < 10, f"the call took {o.elapsed:.1f} s to fail with a 0.5 s deadline"

    waited = wait_until_serves(stub, within_s=30, what="a client deadline")
    assert waited < 15, f"the server needed {waited:.1f} s to serve again after a deadline"
    _healthy(stub)


def test_deadline_expiring_on_the_server_answers_deadline_exceeded(start_server):
    """When the deadline the server was given passes first on the server's side (any
    client whose own timer fires later, e.g. on a loaded machine), the server itself must
    answer DEADLINE_EXCEEDED. To make the server's timer win every time, the call carries
    a `grpc-timeout` header of 500 ms and no deadline in the Python client (which would
    otherwise replace the header with its own)."""
    srv = start_server(*SLOW, label="server-side-timeout")
    stub = srv.stub()
    wait_until_serves(stub, what="start-up")

    o = call(stub.Compress, pb.CompressRequest(format=GZIP, data=BIG, level=1), timeout=None,
             metadata=(("grpc-timeout", "500m"),))
    expect_error(o, DEADLINE, what="a 2 MiB job whose 500 ms grpc-timeout expires on the server")
    assert o.elapsed < 2.0 + 1.5, f"the 500 ms deadline was answered after {o.elapsed:.2f} s"
    wait_until_serves(stub, within_s=30, what="a server-side deadline")


def test_abandoned_queued_jobs_are_not_run(start_server):
    """Jobs still waiting when their caller's deadline passes must leave the queue:
    a later call must not wait behind them."""
    srv = start_server(*SLOW, "--max-queued-jobs", 16, label="abandoned")
    stub = srv.stub()
    wait_until_serves(stub, what="start-up")

    with cf.ThreadPoolExecutor(max_workers=2) as ex:
        start = time.monotonic()
        first = ex.submit(_compress, stub, BIG[:MiB], 60)  # about 1 s on the device
        time.sleep(0.3)
        abandoned = _fire_together(lambda i: _compress(stub, BIG, timeout=0.5), 4)  # 4 x 2.1 s if run
        for o in abandoned:
            expect_error(o, DEADLINE, what="a queued 2 MiB job with a 0.5 s client deadline")
        after = _compress(stub, b"after", timeout=60)
        finished = time.monotonic() - start
        assert first.result().ok, first.result().describe()
    assert after.ok, after.describe()
    # Without the abandoned jobs: about 1 s. Running them as well: about 9.5 s.
    assert finished < 6, f"a tiny call queued after 4 abandoned jobs finished after {finished:.1f} s; " \
                         "the abandoned jobs seem to have run"


def test_server_default_deadline(start_server):
    srv = start_server(*SLOW, "--default-deadline-ms", 1000, label="default-deadline")
    stub = srv.stub()
    wait_until_serves(stub, what="start-up")

    o = _compress(stub, BIG, timeout=None)  # no client deadline; about 2.1 s of device time
    expect_error(o, DEADLINE, what="a 2 MiB job with no client deadline and a 1 s server default")
    assert 0.8 <= o.elapsed < 2.0 + 1.5, f"server default deadline of 1 s fired after {o.elapsed:.2f} s"

    waited = wait_until_serves(stub, within_s=30, what="the server default deadline")
    assert waited < 15, f"the server needed {waited:.1f} s to serve again"
    _healthy(stub)


def test_client_deadline_longer_than_server_default(start_server):
    """--default-deadline-ms is for "calls that set none": a call with its own, longer
    deadline must be allowed to finish."""
    srv = start_server(*SLOW, "--default-deadline-ms", 1000, label="long-client-deadline")
    stub = srv.stub()
    wait_until_serves(stub, what="start-up")

    o = _compress(stub, BIG, timeout=30)  # about 2.1 s of device time, 30 s client deadline
    assert o.ok, f"a 2 MiB job with a 30 s client deadline (server default 1 s) -> {o.describe()}"
    assert gzip.decompress(o.response.data) == BIG
