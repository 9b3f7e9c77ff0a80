"""Tenants: API-key authentication, SIGHUP reload, per-tenant admission, deadlines,
cancellation and key hygiene in the log.

Servers read a tenants file written by the test (keys are random per session and
only their SHA-256 goes into the file). The slow servers use one queue, one engine,
one descriptor in flight and a 2 MB/s engine cap: a 256 KiB job takes about 0.13 s,
1 MiB about 0.52 s and 4 MiB about 2.1 s of device time.
"""
import concurrent.futures as cf
import gzip
import os
import threading
import time

import grpc
import pytest

from agtest import (CALL_TIMEOUT_S, GZIP, KiB, MiB, REJECTION_REASON, RETRY_AFTER, Tenant, bearer, call,
                    device_jobs, expect_error, key_hash, new_key, pb, py_compress, sighup_and_wait, tenants_yaml,
                    text_bytes, wait_device_idle, write_tenants)

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED

SLOW = ("--queues", 1, "--engines", 1, "--in-flight-per-queue", 1, "--engine-cap-mbps", 2)
SMALL = text_bytes(4 * KiB, seed=3)
BLOCK = os.urandom(256 * KiB)
ONE_MIB = os.urandom(MiB)
FOUR_MIB = os.urandom(4 * MiB)


def _compress(stub, data, md, timeout=CALL_TIMEOUT_S, level=1):
    return call(stub.Compress, pb.CompressRequest(format=GZIP, data=data, level=level), timeout=timeout, metadata=md)


def _ok(stub, md, what="", data=SMALL):
    o = _compress(stub, data, md)
    assert o.ok, f"{what}: Compress -> {o.describe()}"
    assert gzip.decompress(o.response.data) == data
    return o


def _fire_together(fn, n):
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait(30)
        return fn(i)

    with cf.ThreadPoolExecutor(max_workers=n) as ex:
        return [f.result() for f in [ex.submit(run, i) for i in range(n)]]


def _check_rejection(o, reason, what):
    expect_error(o, EXHAUSTED, retry_hint=True, what=what)
    hint = o.trailing[RETRY_AFTER]
    assert hint.isdigit() and 0 < int(hint) <= 60_000, f"{RETRY_AFTER} is not a plausible delay: {hint!r} ({what})"
    assert o.trailing.get(REJECTION_REASON) == reason, \
        f"{what}: expected {REJECTION_REASON} {reason!r}, got {o.describe()}"


# ---------------------------------------------------------------------------------------
# A fast server with several tenants


ALPHA = Tenant("alpha", [new_key("alpha1"), new_key("alpha2")], weight=2)
BETA = Tenant("beta", [new_key("beta")])
LIMITED = Tenant("limited", [new_key("limited")], limits={"max_payload_bytes": 100_000})
RATE = 200_000
RATED = Tenant("rated", [new_key("rated")], limits={"max_bytes_per_second": RATE, "max_payload_bytes": 64 * KiB})
FAST_TENANTS = [ALPHA, BETA, LIMITED, RATED]


@pytest.fixture(scope="module")
def fast(start_module_server, tmp_path_factory):
    path = write_tenants(str(tmp_path_factory.mktemp("tenants") / "tenants.yaml"), FAST_TENANTS)
    return start_module_server("--tenants", path, label="fast")


METHODS = {
    "Compress": lambda s, md: call(s.Compress, pb.CompressRequest(format=GZIP, data=SMALL), metadata=md),
    "Decompress": lambda s, md: call(s.Decompress, pb.DecompressRequest(format=GZIP, data=gzip.compress(SMALL)),
                                     metadata=md),
    "DescribeDevice": lambda s, md: call(s.DescribeDevice, pb.DescribeDeviceRequest(), metadata=md),
}

BAD_CREDENTIALS = {
    # name: (metadata, expected words in the message)
    "missing": ((), "missing"),
    "other-header-only": ((("x-api-key", ALPHA.keys[0]),), "missing"),
    "unknown-key": (bearer(new_key("stranger")), "unknown API key"),
    "key-with-suffix": (bearer(ALPHA.keys[0] + "x"), "unknown API key"),
    "key-truncated": (bearer(ALPHA.keys[0][:-1]), "unknown API key"),
    "key-wrong-case": (bearer(ALPHA.keys[0].swapcase()), "unknown API key"),
    "hash-as-key": (bearer(key_hash(ALPHA.keys[0])), "unknown API key"),
    "bearer-without-key": ((("authorization", "Bearer"),), ""),
    "bearer-space-only": ((("authorization", "Bearer "),), ""),
    "no-scheme": ((("authorization", ALPHA.keys[0]),), ""),
    "basic-scheme": ((("authorization", "Basic " + ALPHA.keys[0]),), ""),
    "scheme-glued": ((("authorization", "Bearer" + ALPHA.keys[0]),), ""),
    "empty-value": ((("authorization", ""),), ""),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("case", list(BAD_CREDENTIALS))
def test_unauthenticated(fast, case, method):
    md, words = BAD_CREDENTIALS[case]
    o = METHODS[method](fast.stub(), md)
    expect_error(o, UNAUTH, what=f"{method} with {case} credentials")
    assert words.lower() in o.details.lower(), f"{case}: message {o.details!r} lacks {words!r}"
    for t in FAST_TENANTS:
        for k in t.keys:
            assert k not in o.details and k[:12] not in o.details, f"the error message echoes a key: {o.details!r}"


def test_unauthenticated_calls_never_reach_the_device(fast):
    stub = fast.stub()
    before = device_jobs(stub, ALPHA.md)
    for case, (md, _) in BAD_CREDENTIALS.items():
        for _ in range(3):
            o = _compress(stub, SMALL, md)
            assert o.code == UNAUTH, f"{case}: {o.describe()}"
    assert device_jobs(stub, ALPHA.md) == before, "unauthenticated calls ran on the device"


@pytest.mark.parametrize("tenant", FAST_TENANTS, ids=lambda t: t.id)
def test_every_key_of_every_tenant_works(fast, tenant):
    for k in tenant.keys:
        _ok(fast.stub(), bearer(k), f"tenant {tenant.id}")
        d = call(fast.stub().DescribeDevice, pb.DescribeDeviceRequest(), metadata=bearer(k))
        assert d.ok, d.describe()


def test_bearer_scheme_is_case_insensitive(fast):
    """RFC 7235: the auth scheme name is case-insensitive (the key itself is not)."""
    for scheme in ("bearer", "BEARER", "BeArEr"):
        _ok(fast.stub(), (("authorization", f"{scheme} {ALPHA.keys[0]}"),), f"scheme {scheme!r}")


def test_open_default_mode_needs_no_key(stub):
    """Without a tenants file every call is the open `default` tenant."""
    _ok(stub, None, "open mode, no key")
    _ok(stub, bearer("anything-at-all"), "open mode, arbitrary key")
    d = call(stub.DescribeDevice, pb.DescribeDeviceRequest())
    assert d.ok, d.describe()
    dec = call(stub.Decompress, pb.DecompressRequest(format=GZIP, data=gzip.compress(SMALL)))
    assert dec.ok and dec.response.data == SMALL, dec.describe()


def test_payload_over_tenant_limit_has_no_retry_hint(fast):
    stub = fast.stub()
    limit = LIMITED.limits["max_payload_bytes"]
    data = os.urandom(limit + 1)
    _ok(stub, LIMITED.md, "payload of exactly max_payload_bytes", data=data[:limit])
    o = _compress(stub, data, LIMITED.md)
    expect_error(o, EXHAUSTED, retry_hint=False, what=f"Compress of {limit + 1} B over a {limit} B tenant limit")
    stored = py_compress(GZIP, data, 0)  # a valid stream whose input is over the limit
    o = call(stub.Decompress, pb.DecompressRequest(format=GZIP, data=stored), metadata=LIMITED.md)
    expect_error(o, EXHAUSTED, retry_hint=False, what=f"Decompress of {len(stored)} B over a {limit} B tenant limit")
    # The limit is the tenant's, not the server's.
    _ok(stub, BETA.md, "the same payload for a tenant with the default limit", data=data)
    _ok(stub, LIMITED.md, "a small call after the rejection")


def test_rate_cap_rejects_with_rate_limited(fast):
    """max_bytes_per_second is a token bucket of one second (here 200 kB, as the
    64 KiB payload limit is smaller): a burst goes through, then rate_limited with a
    hint, and over time the admitted bytes follow the rate."""
    stub = fast.stub()
    job = os.urandom(64 * KiB)
    start = time.monotonic()
    admitted = 0
    first_rejection = None
    for _ in range(10):
        o = _compress(stub, job, RATED.md)
        if not o.ok:
            first_rejection = o
            break
        admitted += len(job)
    assert first_rejection is not None, \
        f"10 back-to-back 64 KiB calls ({10 * len(job)} B) under a {RATE} B/s cap: none was rejected"
    _check_rejection(first_rejection, "rate_limited", "a call over the tenant's byte rate")
    assert int(first_rejection.trailing[RETRY_AFTER]) <= 1000, \
        f"a 64 KiB job at {RATE} B/s should not need more than ~0.33 s: {first_rejection.describe()}"
    rejected_at = time.monotonic()
    burst_s = rejected_at - start
    assert admitted <= RATE + RATE * burst_s + len(job), f"{admitted} B admitted in {burst_s:.2f} s"

    # Another tenant is not slowed by this one's cap.
    for _ in range(5):
        _ok(stub, BETA.md, "another tenant while `rated` is rate limited", data=job)

    # Following the hints, about RATE bytes per second get through.
    t0 = time.monotonic()
    got = 0
    rejections = 0
    while time.monotonic() - t0 < 2.0:
        o = _compress(stub, job, RATED.md)
        if o.ok:
            got += len(job)
            assert gzip.decompress(o.response.data) == job
            continue
        _check_rejection(o, "rate_limited", "a call over the tenant's byte rate")
        rejections += 1
        time.sleep(int(o.trailing[RETRY_AFTER]) / 1000.0)
    span = time.monotonic() - t0
    assert rejections >= 2, f"only {rejections} rate_limited answers in {span:.1f} s of calls at the cap"
    # At t0 the bucket held less than one job plus what it earned since the rejection
    # (at most the one-second burst); everything after that is earned at RATE.
    at_t0 = min(RATE, len(job) + RATE * (t0 - rejected_at))
    assert got <= at_t0 + RATE * span + len(job), f"{got} B admitted in {span:.2f} s under a {RATE} B/s cap"
    assert got >= RATE * span * 0.4, f"only {got} B admitted in {span:.2f} s following the retry hints (cap {RATE} B/s)"


# ---------------------------------------------------------------------------------------
# SIGHUP reload


def test_reload_adds_tenant_without_failing_calls_in_flight(start_server, tmp_path):
    a = Tenant("a", [new_key("a")])
    c = Tenant("c", [new_key("c")])
    d = Tenant("d", [new_key("d")], weight=3)
    path = write_tenants(str(tmp_path / "tenants.yaml"), [a])
    # 64 KiB at 20 MB/s is about 3 ms on the device: calls are always in flight.
    srv = start_server("--tenants", path, "--queues", 1, "--engines", 1, "--engine-cap-mbps", 20, label="reload")
    stub = srv.stub()
    _ok(stub, a.md, "before the reload")
    o = _compress(stub, SMALL, c.md)
    expect_error(o, UNAUTH, what="tenant c before it is added")

    payload = os.urandom(64 * KiB)
    stop = threading.Event()
    records = []  # (start, end, outcome)
    lock = threading.Lock()

    def loop():
        s = srv.new_stub()
        while not stop.is_set():
            t = time.monotonic()
            o = _compress(s, payload, a.md, timeout=30)
            if o.ok and gzip.decompress(o.response.data) != payload:
                o.code, o.details = grpc.StatusCode.DATA_LOSS, "wrong output"
            with lock:
                records.append((t, time.monotonic(), o))

    stream_results = []

    def stream():
        def items():
            i = 0
            while not stop.is_set():
                yield pb.SubmitRequest(id=str(i), compress=pb.CompressRequest(format=GZIP, data=payload, level=1))
                i += 1
                time.sleep(0.005)
        try:
            for r in srv.new_stub().Submit(items(), timeout=60, metadata=a.md):
                stream_results.append(r)
        except grpc.RpcError as e:
            stream_results.append(e)

    threads = [threading.Thread(target=loop) for _ in range(4)] + [threading.Thread(target=stream)]
    for th in threads:
        th.start()
    signals = []
    try:
        time.sleep(0.5)
        for tenants in ([a, c], [a, c, d], [a, d], [a, c], [a, c]):
            write_tenants(path, tenants)
            signals.append(time.monotonic())
            sighup_and_wait(srv)
            for t in tenants:
                _ok(stub, t.md, f"tenant {t.id} after the reload to {[x.id for x in tenants]}")
            time.sleep(0.3)
    finally:
        stop.set()
        for th in threads:
            th.join(60)
    failed = [o.describe() for _, _, o in records if not o.ok]
    assert not failed, f"{len(failed)} of {len(records)} calls failed around the reloads: {failed[:5]}"
    assert len(records) >= 40, f"only {len(records)} calls in the background loop"
    for s in signals:
        spanning = [1 for t0, t1, _ in records if t0 < s < t1]
        assert spanning, "no call was in flight at a SIGHUP; the test proves nothing"
    errors = [r for r in stream_results if isinstance(r, grpc.RpcError)]
    assert not errors, f"the Submit stream across the reloads ended with {errors[0].code()} {errors[0].details()}"
    bad = [(r.id, r.code, r.message) for r in stream_results if r.code != 0]
    assert not bad, f"Submit items failed across the reloads: {bad[:5]}"
    assert len(stream_results) >= 20, f"only {len(stream_results)} Submit results"
    # The final file has a and c, not d.
    o = _compress(stub, SMALL, d.md)
    expect_error(o, UNAUTH, what="tenant d after it was removed")


def test_removed_tenant_key_is_rejected_but_its_calls_in_flight_finish(start_server, tmp_path):
    a = Tenant("a", [new_key("a")])
    b = Tenant("b", [new_key("b1"), new_key("b2")])
    path = write_tenants(str(tmp_path / "tenants.yaml"), [a, b])
    srv = start_server("--tenants", path, *SLOW, label="remove")
    stub = srv.stub()
    for k in b.keys:
        _ok(stub, bearer(k), "tenant b before the reload")
    running = stub.Compress.future(pb.CompressRequest(format=GZIP, data=ONE_MIB, level=1), metadata=b.md,
                                   timeout=60)
    queued = stub.Compress.future(pb.CompressRequest(format=GZIP, data=BLOCK, level=1), metadata=b.md, timeout=60)
    time.sleep(0.1)
    write_tenants(path, [a])
    sighup_and_wait(srv)
    for k in b.keys:
        o = _compress(stub, SMALL, bearer(k))
        expect_error(o, UNAUTH, what="a key of a tenant removed by SIGHUP")
        assert "unknown API key" in o.details, o.describe()
    _ok(stub, a.md, "tenant a after b was removed")
    for name, fut, data in (("running", running, ONE_MIB), ("queued", queued, BLOCK)):
        try:
            r = fut.result(timeout=60)
        except grpc.RpcError as e:
            raise AssertionError(f"the {name} call of tenant b admitted before the reload failed: "
                                 f"{e.code().name} {e.details()!r}") from None
        assert gzip.decompress(r.data) == data


BROKEN = {
    "not-yaml": "tenants: [ {id: x, : :\n",
    "empty-tenant-list": "tenants: []\n",
    "weight-zero": "{tenants}    weight: 0\n",
    "weight-too-big": "{tenants}    weight: 10001\n",
    "short-hash": "tenants:\n  - id: c\n    api_key_sha256: [abc123]\n",
    "no-keys": "tenants:\n  - id: c\n    api_key_sha256: []\n",
    "bad-id": "tenants:\n  - id: 'c d/e'\n    api_key_sha256: [{hash_c}]\n",
    "duplicate-id": "{tenants}  - id: a\n    api_key_sha256: [{hash_c}]\n",
    "key-shared-by-two": "{tenants}  - id: e\n    api_key_sha256: [{hash_a}]\n",
    "negative-limit": "{tenants}    limits:\n      max_queued_jobs: -1\n",
    "wrong-type": "{tenants}    weight: heavy\n",
    "missing-file": None,
}


def test_broken_file_on_reload_keeps_old_tenants(start_server, tmp_path):
    a = Tenant("a", [new_key("a")])
    c = Tenant("c", [new_key("c")])
    path = str(tmp_path / "tenants.yaml")
    write_tenants(path, [a])
    srv = start_server("--tenants", path, label="broken")
    stub = srv.stub()
    _ok(stub, a.md, "before any reload")
    with_c = tenants_yaml([a, c])  # ends inside c's entry, so appended lines belong to c
    for name, text in BROKEN.items():
        if text is None:
            os.remove(path)
        else:
            text = text.replace("{tenants}", with_c).replace("{hash_a}", key_hash(a.keys[0]))
            write_tenants(path, text=text.replace("{hash_c}", key_hash(c.keys[0])))
        line = sighup_and_wait(srv, ok=False)
        assert "keep" in line.lower() or "previous" in line.lower() or "error" in line.lower(), line
        _ok(stub, a.md, f"tenant a after a reload of a broken file ({name})")
        o = _compress(stub, SMALL, c.md)
        expect_error(o, UNAUTH, what=f"tenant c from a broken file ({name}) must not be half-applied")
    # A good file is still picked up after all that.
    write_tenants(path, [a, c])
    sighup_and_wait(srv)
    _ok(stub, c.md, "tenant c after a good reload")
    _ok(stub, a.md, "tenant a after a good reload")


# ---------------------------------------------------------------------------------------
# Per-tenant admission on a slow device

Q_ALPHA = Tenant("qalpha", [new_key("qalpha")], limits={"max_queued_jobs": 2})
Q_BETA = Tenant("qbeta", [new_key("qbeta")])
Q_BYTES = Tenant("qbytes", [new_key("qbytes")], limits={"max_queued_bytes": 600_000})
Q_DEADLINE = Tenant("qdeadline", [new_key("qdeadline")])
Q_CANCEL = Tenant("qcancel", [new_key("qcancel")], limits={"max_queued_jobs": 1})
SLOW_TENANTS = [Q_ALPHA, Q_BETA, Q_BYTES, Q_DEADLINE, Q_CANCEL]


@pytest.fixture(scope="module")
def slow(start_module_server, tmp_path_factory):
    path = write_tenants(str(tmp_path_factory.mktemp("tenants") / "tenants.yaml"), SLOW_TENANTS)
    return start_module_server("--tenants", path, *SLOW, label="slow")


def test_tenant_queue_full_rejects_with_retry_hint(slow):
    stub = slow.stub()
    wait_device_idle(stub, Q_BETA.md)
    n = 12

    def fire(i):
        if i < 2:
            return "beta", _compress(stub, BLOCK, Q_BETA.md, timeout=60)
        return "alpha", _compress(stub, BLOCK, Q_ALPHA.md, timeout=60)

    outcomes = _fire_together(fire, n + 2)
    alpha = [o for who, o in outcomes if who == "alpha"]
    beta = [o for who, o in outcomes if who == "beta"]
    ok = [o for o in alpha if o.ok]
    rejected = [o for o in alpha if not o.ok]
    # 1 on the device + 2 waiting; a job finishing during the burst (0.13 s each) may let one more in.
    assert 3 <= len(ok) <= 6, f"{len(ok)} of {n} concurrent calls admitted with max_queued_jobs 2: " \
                              f"{[o.describe() for o in rejected][:3]}"
    for o in ok:
        assert gzip.decompress(o.response.data) == BLOCK
    for o in rejected:
        _check_rejection(o, "tenant_queue_full", "a call against the tenant's full queue")
    for o in beta:
        assert o.ok, f"another tenant was refused while qalpha's queue was full: {o.describe()}"
    # Rejections answer at once; admitted calls wait for the device.
    assert max(o.elapsed for o in rejected) < max(o.elapsed for o in ok)

    # Following the hint gets through.
    give_up = time.monotonic() + 30
    while True:
        o = _compress(stub, BLOCK, Q_ALPHA.md, timeout=60)
        if o.ok:
            break
        _check_rejection(o, "tenant_queue_full", "a retry")
        assert time.monotonic() < give_up, f"still rejected after 30 s: {o.describe()}"
        time.sleep(int(o.trailing[RETRY_AFTER]) / 1000.0)


def test_tenant_queued_bytes_rejects_with_retry_hint(slow):
    stub = slow.stub()
    wait_device_idle(stub, Q_BETA.md)
    outcomes = _fire_together(lambda i: _compress(stub, BLOCK, Q_BYTES.md, timeout=60), 8)
    ok = [o for o in outcomes if o.ok]
    rejected = [o for o in outcomes if not o.ok]
    # 600 000 B hold two 256 KiB jobs waiting (plus one on the device).
    assert rejected, "8 concurrent 256 KiB calls against max_queued_bytes 600000: none rejected"
    assert 2 <= len(ok) <= 5, f"{len(ok)} of 8 admitted: {[o.describe() for o in rejected][:3]}"
    for o in rejected:
        _check_rejection(o, "tenant_queued_bytes", "a call over the tenant's queued bytes")
    wait_device_idle(stub, Q_BETA.md)


def test_deadline_while_queued_never_reaches_device(slow):
    stub = slow.stub()
    md = Q_DEADLINE.md
    before = wait_device_idle(stub, md)
    blocker = stub.Compress.future(pb.CompressRequest(format=GZIP, data=FOUR_MIB, level=1), metadata=md, timeout=60)
    time.sleep(0.3)  # the blocker is on the device (about 2.1 s)
    o = _compress(stub, ONE_MIB, md, timeout=0.5)
    expect_error(o, DEADLINE, what="a queued 1 MiB job whose 0.5 s deadline passes behind a 2.1 s job")
    assert o.elapsed < 1.6, f"DEADLINE_EXCEEDED came after {o.elapsed:.2f} s for a 0.5 s deadline"
    assert not blocker.done(), "the blocker finished too early; the expired job may not have been queued"
    assert gzip.decompress(blocker.result(timeout=60).data) == FOUR_MIB
    after = wait_device_idle(stub, md)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1), \
        f"engine jobs / queue completed went from {before} to {after}: the expired job reached the device"
    _ok(stub, md, "after the expired job")


def test_cancelled_queued_call_leaves_queue_at_once(slow):
    stub = slow.stub()
    md = Q_CANCEL.md  # max_queued_jobs 1
    before = wait_device_idle(stub, md)
    started = time.monotonic()
    blocker = stub.Compress.future(pb.CompressRequest(format=GZIP, data=FOUR_MIB, level=1), metadata=md, timeout=60)
    time.sleep(0.3)
    queued = stub.Compress.future(pb.CompressRequest(format=GZIP, data=ONE_MIB, level=1), metadata=md, timeout=60)
    time.sleep(0.3)
    probe = _compress(stub, SMALL, md)
    _check_rejection(probe, "tenant_queue_full", "a call while the tenant's one queue slot is taken")
    assert queued.cancel(), "grpc could not cancel the queued call"
    with pytest.raises(grpc.FutureCancelledError):
        queued.result()

    # The slot must free up while the blocker still runs: a probe sent now is
    # admitted (and then waits for the device) instead of being refused at once.
    admitted = None
    while time.monotonic() - started < 1.7:
        blocker_running = not blocker.done()
        try:
            r = stub.Compress(pb.CompressRequest(format=GZIP, data=SMALL, level=1), metadata=md, timeout=60)
        except grpc.RpcError as e:
            assert e.code() == EXHAUSTED, f"probe after the cancel -> {e.code()} {e.details()!r}"
            time.sleep(0.02)
            continue
        admitted = (blocker_running, r)
        break
    assert admitted is not None, \
        "the tenant's only queue slot stayed taken for about 1 s after its queued call was cancelled"
    assert admitted[0], "the blocker had already finished when the probe was sent; the test was too slow to tell"
    assert gzip.decompress(admitted[1].data) == SMALL
    assert gzip.decompress(blocker.result(timeout=60).data) == FOUR_MIB
    after = wait_device_idle(stub, md)
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2), \
        f"engine jobs / queue completed went from {before} to {after}: the cancelled job ran " \
        "(expected the blocker and the probe only)"
    for _ in range(3):
        _ok(stub, md, "after the cancellation")


# ---------------------------------------------------------------------------------------
# Keys never reach the log


def test_keys_never_appear_in_the_log(start_server, tmp_path):
    a = Tenant("a", [new_key("a1"), new_key("a2")], limits={"max_payload_bytes": 10_000})
    b = Tenant("b", [new_key("b")])
    path = write_tenants(str(tmp_path / "tenants.yaml"), [a, b])
    srv = start_server("--tenants", path, "--log-level", "trace", label="key-safety")
    stub = srv.stub()
    invalid = [new_key("wrong"), new_key("wrong2")]
    for k in a.keys + b.keys:
        _ok(stub, bearer(k), "a valid key")
        o = _compress(stub, os.urandom(20_000), bearer(k))  # over a's payload limit (b: fine)
        assert o.ok or o.code == EXHAUSTED, o.describe()
        d = call(stub.Decompress, pb.DecompressRequest(format=GZIP, data=b"corrupt!"), metadata=bearer(k))
        assert not d.ok, d.describe()
        assert call(stub.DescribeDevice, pb.DescribeDeviceRequest(), metadata=bearer(k)).ok
        results = list(stub.Submit(iter([pb.SubmitRequest(id="1", compress=pb.CompressRequest(format=GZIP,
                                                                                              data=SMALL))]),
                                   timeout=30, metadata=bearer(k)))
        assert [r.code for r in results] == [0]
    for k in invalid:
        for md in (bearer(k), (("authorization", k),), (("authorization", "Basic " + k),)):
            expect_error(_compress(stub, SMALL, md), UNAUTH, what="an invalid key")
    write_tenants(path, [b])
    sighup_and_wait(srv)
    expect_error(_compress(stub, SMALL, a.md), UNAUTH, what="a removed key")
    srv.stop()  # flushes and closes the log
    with open(srv.log_path, "rb") as f:
        log = f.read().decode(errors="replace")
    assert "listening" in log and "reload" in log, "the log is not the server's log"
    for k in a.keys + b.keys + invalid:
        for piece in (k, k.split("-", 1)[1]):
            assert piece not in log, f"key {k[:8]}... appears in the server log {srv.log_path}"


def test_describe_device_shows_the_caller_its_own_tenant_only(start_server, tmp_path):
    import hashlib
    from agtest import pb as _pb
    f = tmp_path / "tenants.yaml"
    f.write_text("tenants:\n"
                 "  - { id: alpha, weight: 3, api_key_sha256: [%s], limits: { max_queued_jobs: 7, max_bytes_per_second: 1000000 } }\n"
                 "  - { id: beta, api_key_sha256: [%s] }\n" % (hashlib.sha256(b"ka").hexdigest(), hashlib.sha256(b"kb").hexdigest()))
    srv = start_server("--tenants", str(f), "--engines", "1", label="describe-tenant")
    d = srv.new_stub().DescribeDevice(_pb.DescribeDeviceRequest(), timeout=10, metadata=[("authorization", "Bearer ka")])
    assert (d.tenant.id, d.tenant.weight, d.tenant.max_queued_jobs, d.tenant.max_bytes_per_second) == ("alpha", 3, 7, 1000000)
    assert "beta" not in str(d)
    d = srv.new_stub().DescribeDevice(_pb.DescribeDeviceRequest(), timeout=10, metadata=[("authorization", "Bearer kb")])
    assert (d.tenant.id, d.tenant.weight) == ("beta", 1)
