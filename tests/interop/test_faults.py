"""Device faults and recovery, seen from a gRPC client.

* Fault injection on the embedded device (`serve --inject-fault MODE`): every mode
  gives the documented status within seconds, and the server survives it.
* Retry once: with `every=2` the retry on a healthy queue hides the faults.
* Isolation: repeated queue errors isolate the device; health says NOT_SERVING and
  calls fail fast.
* A standalone daemon's faults changed at run time over its control socket
  (`--allow-fault-control`), and refused without that flag.
* Software fallback: a gateway keeps serving from an embedded device while its
  daemon is down (or was never there) and returns to the daemon when it is back.

Bounds are generous (seconds): they catch hangs, not slowness.
"""
import gzip
import os
import time
import zlib

import grpc
import pytest

from agstubs_health import health_pb2, health_pb2_grpc
from agtest import DEFLATE, FORMAT_NAMES, GZIP, KiB, ZLIB, WBITS, call, pb, py_decompress_strict, text_bytes
from daemonhelp import Control, DaemonFactory, DeviceDaemon, short_tmpdir

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# One engine, a short idle spin: faults act on every job, and an idle server costs little.
DEVICE = ("--engines", 1, "--idle-spin-us", 10)
# Short watchdog wherever completions go missing (lost, stall), so failures come in ~2 s.
FAST_WATCHDOG = ("--completion-timeout-ms", 1000)
# A failing call must end within this (first try + watchdog + retry + watchdog, with room).
FAIL_WITHIN_S = 15.0

DATA = text_bytes(32 * KiB, seed=71)


# ----------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def daemons(request):
    """daemons(*flags, label="") starts an `accelgate device` on a fresh socket; all are
    stopped (and must not have died, and must exit 0 on SIGTERM) when the test ends.
    Request it before `start_server`, so gateways are stopped before their daemons."""
    factory = DaemonFactory(request.node.name)
    yield factory
    factory.stop_all()


def compress(stub, data=DATA, fmt=GZIP, timeout=30.0):
    return call(stub.Compress, pb.CompressRequest(format=fmt, data=data), timeout=timeout)


def assert_round_trip(outcome, data=DATA, fmt=GZIP, what=""):
    assert outcome.ok, f"Compress{(' ' + what) if what else ''} -> {outcome.describe()}"
    assert py_decompress_strict(fmt, outcome.response.data) == data, \
        f"Compress{(' ' + what) if what else ''}: output does not decompress to the input"
    if fmt == GZIP:
        assert gzip.decompress(outcome.response.data) == data


def expect_unavailable(outcome, *needles, within_s=FAIL_WITHIN_S, what=""):
    where = f" ({what})" if what else ""
    assert outcome.code == UNAVAILABLE, f"expected UNAVAILABLE{where}, got {outcome.describe()}"
    assert outcome.elapsed < within_s, f"UNAVAILABLE{where} took {outcome.elapsed:.2f} s (bound {within_s} s)"
    for n in needles:
        assert n in outcome.details, f"UNAVAILABLE{where}: message {outcome.details!r} lacks {n!r}"


def describe(stub):
    o = call(stub.DescribeDevice, pb.DescribeDeviceRequest(), timeout=10)
    assert o.ok, f"DescribeDevice -> {o.describe()}"
    return o.response


def health(srv):
    return health_pb2_grpc.HealthStub(srv.channel())


def health_status(srv):
    return health(srv).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def poll(predicate, within_s, interval=0.1):
    """Calls predicate() until it returns something truthy; returns that, or the last
    (falsy) value after within_s."""
    deadline = time.monotonic() + within_s
    while True:
        v = predicate()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


def assert_alive(srv, what):
    assert srv.alive(), f"server died after {what}\n{srv.log_tail()}"
    # It still answers: DescribeDevice needs no device job.
    describe(srv.new_stub())


def control(daemon):
    c = Control(daemon.path)
    c.hello()
    return c


def device_status(daemon):
    with control(daemon) as c:
        reply = c.ask({"op": "status"})
    assert reply.get("ok") is True, f"status -> {reply}"
    return reply


def inject(daemon, fault):
    with control(daemon) as c:
        reply = c.ask({"op": "inject", "fault": fault})
    assert reply.get("ok") is True, f"inject {fault!r} -> {reply}"
    return reply


def wait_serving_call(stub, within_s, what, timeout=3.0):
    """Polls Compress until one succeeds (and round-trips); returns the seconds taken."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < within_s:
        last = compress(stub, timeout=timeout)
        if last.ok:
            assert_round_trip(last, what=what)
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"no Compress succeeded within {within_s} s {what}; last: {last.describe()}")


# ----------------------------------------------------------------------------------------
# 1. Each fault mode, every job, embedded device

# mode -> (extra flags, words the UNAVAILABLE message must contain, queue counter that must
# move; a DEVICE_FAULT completion is well-formed and on time, so no counter is specific to it)
FAILING_MODES = {
    "error": ((), ("device fault",), None),
    "lost": (FAST_WATCHDOG, ("no completion within",), "stalls"),
    "corrupt-completion": ((), ("malformed completion",), "invalid_completions"),
    "stall": (FAST_WATCHDOG, ("no completion within",), "stalls"),
}


@pytest.mark.parametrize("mode", list(FAILING_MODES))
def test_failing_mode_gives_unavailable_within_seconds(start_server, mode):
    flags, needles, counter = FAILING_MODES[mode]
    srv = start_server(*DEVICE, *flags, "--inject-fault", mode, label=mode)
    stub = srv.new_stub()
    o = compress(stub, timeout=60)
    expect_unavailable(o, *needles, what=f"--inject-fault {mode}")
    r = describe(stub)
    assert r.device.fault_injection == mode, r.device
    assert r.device.retried_jobs >= 1, f"the failed job was not retried once: {r.device}"
    if counter:
        assert sum(getattr(q, counter) for q in r.queues) >= 1, \
            f"no queue counts {counter} after a {mode} fault: {list(r.queues)}"
    assert_alive(srv, f"a {mode} fault")


def test_stall_later_calls_also_fail_within_seconds(start_server):
    """Later calls on a stalled device fail fast too, not at their deadline.

    With `--inject-fault stall` on a one-engine device, the first call fails with
    UNAVAILABLE after ~2 s (watchdog, retry, watchdog). Both queues then wait for a
    reset the hung engine cannot perform; once that reset is overdue (one completion
    timeout) the queues no longer count as recoverable, so later calls fail at once
    with UNAVAILABLE instead of waiting out their deadlines. (This was a real bug:
    such calls used to hang until DEADLINE_EXCEEDED.)"""
    srv = start_server(*DEVICE, *FAST_WATCHDOG, "--inject-fault", "stall", label="stall-later")
    stub = srv.new_stub()
    first = compress(stub, timeout=60)
    expect_unavailable(first, "no completion within", what="first call on a stalled device")
    o = compress(stub, timeout=20)
    r = describe(stub)
    state = "; ".join(f"queue {q.id} state={q.state} in_flight={q.in_flight} recovery={q.recovery!r}"
                      for q in r.queues)
    expect_unavailable(o, what=f"second call on a stalled device; first: {first.describe()}; "
                               f"healthy={r.device.healthy}; {state}")
    assert_alive(srv, "calls on a stalled device")


def test_latency_exceeds_short_deadline_and_completes_without_one(start_server):
    srv = start_server(*DEVICE, "--inject-fault", "latency,latency-ms=1500", label="latency")
    stub = srv.new_stub()
    assert describe(stub).device.fault_injection == "latency,latency-ms=1500"
    o = compress(stub, timeout=0.3)
    assert o.code == DEADLINE_EXCEEDED, f"expected DEADLINE_EXCEEDED with a 0.3 s deadline, got {o.describe()}"
    assert o.elapsed < 5, o.describe()
    for fmt in (GZIP, ZLIB):
        o = call(stub.Compress, pb.CompressRequest(format=fmt, data=DATA), timeout=None)
        assert_round_trip(o, fmt=fmt, what=f"{FORMAT_NAMES[fmt]} with 1.5 s injected latency")
        assert o.elapsed >= 1.4, f"injected latency not seen: the call took {o.elapsed:.2f} s"
    assert_alive(srv, "injected latency")


def _decodes_to(fmt, data, original) -> bool:
    try:
        d = zlib.decompressobj(WBITS[fmt])
        out = d.decompress(data) + d.flush()
    except zlib.error:
        return False
    return d.eof and not d.unused_data and out == original


def test_corrupt_output_without_verify_returns_wrong_bytes(start_server):
    srv = start_server(*DEVICE, "--inject-fault", "corrupt-output", label="corrupt-output")
    stub = srv.new_stub()
    r = describe(stub)
    assert r.device.fault_injection == "corrupt-output" and not r.device.verify_compression, r.device
    for fmt in (GZIP, ZLIB, DEFLATE):
        o = call(stub.Compress, pb.CompressRequest(format=fmt, data=DATA), timeout=30)
        # Silent data corruption: the call succeeds, only the bytes are wrong.
        assert o.ok, f"{FORMAT_NAMES[fmt]}: expected OK (nothing verifies the output), got {o.describe()}"
        assert not _decodes_to(fmt, o.response.data, DATA), \
            f"{FORMAT_NAMES[fmt]}: the corrupted output still decompresses to the input"
    assert_alive(srv, "corrupt output")


def test_corrupt_output_with_verify_gives_unavailable(start_server):
    srv = start_server(*DEVICE, "--verify-compression", "--inject-fault", "corrupt-output",
                       label="corrupt-output-verify")
    stub = srv.new_stub()
    assert describe(stub).device.verify_compression
    o = compress(stub, timeout=60)
    expect_unavailable(o, "verify", what="corrupt-output with --verify-compression")
    assert "compress-and-verify mismatch" in o.details, o.describe()
    assert describe(stub).device.retried_jobs >= 1
    assert_alive(srv, "a compress-and-verify mismatch")


def test_verify_compression_passes_on_a_healthy_device(start_server):
    srv = start_server(*DEVICE, "--verify-compression", label="verify-healthy")
    stub = srv.new_stub()
    r = describe(stub)
    assert r.device.verify_compression and r.device.fault_injection in ("", "none"), r.device
    for fmt in (GZIP, ZLIB, DEFLATE):
        assert_round_trip(compress(stub, fmt=fmt), fmt=fmt, what=f"{FORMAT_NAMES[fmt]} with verify")
    assert describe(stub).device.retried_jobs == 0


# ----------------------------------------------------------------------------------------
# 2. every=2: the retry on a healthy queue hides the faults


@pytest.mark.parametrize("mode", ["error", "lost"])
def test_every_second_job_faulty_is_hidden_by_the_retry(start_server, mode):
    srv = start_server(*DEVICE, *FAST_WATCHDOG, "--inject-fault", f"{mode},every=2", label=f"{mode}-every2")
    stub = srv.new_stub()
    for i in range(8):
        data = text_bytes(8 * KiB + i * 1000, seed=200 + i)
        o = compress(stub, data=data, timeout=30)
        assert_round_trip(o, data=data, what=f"call {i + 1} of 8 with {mode},every=2")
        assert o.elapsed < FAIL_WITHIN_S, o.describe()
    r = describe(stub)
    assert r.device.retried_jobs > 0, f"no job was retried: {r.device}"
    assert r.device.fault_injection == f"{mode},every=2", r.device
    if mode == "lost":
        assert any(q.stalls > 0 for q in r.queues), f"no queue counts a stall: {list(r.queues)}"
    assert_alive(srv, f"{mode},every=2")


def test_fault_on_one_queue_is_hidden_by_the_retry_on_the_other(start_server):
    srv = start_server(*DEVICE, *FAST_WATCHDOG, "--queues", 2, "--inject-fault", "lost,queue=0",
                       label="lost-queue0")
    stub = srv.new_stub()
    for i in range(4):
        data = text_bytes(4 * KiB, seed=300 + i)
        o = compress(stub, data=data, timeout=30)
        assert_round_trip(o, data=data, what=f"call {i + 1} with lost,queue=0")
        assert o.response.stats.queue_id == 1, f"call {i + 1} answered from queue {o.response.stats.queue_id}"
    r = describe(stub)
    by_id = {q.id: q for q in r.queues}
    assert by_id[0].stalls >= 1 and by_id[1].stalls == 0, list(r.queues)
    assert r.device.retried_jobs >= 1, r.device
    assert_alive(srv, "lost,queue=0")


# ----------------------------------------------------------------------------------------
# 3. Isolation


def test_repeated_errors_isolate_the_device(start_server):
    srv = start_server(*DEVICE, "--inject-fault", "error", "--isolation-threshold", 3,
                       "--isolation-cooldown-ms", 0, label="isolation")
    stub = srv.new_stub()
    assert health_status(srv) == SERVING
    seen = []
    for _ in range(10):
        o = compress(stub, timeout=30)
        assert o.code == UNAVAILABLE, f"expected UNAVAILABLE with --inject-fault error, got {o.describe()}"
        seen.append(o.details)
        if describe(stub).device.isolated:
            break
    r = describe(stub)
    assert r.device.isolated, f"not isolated after {len(seen)} failing calls: {r.device} {list(r.queues)}"
    assert not r.device.healthy, r.device
    assert r.device.status_detail, r.device
    assert all(q.state == "isolated" for q in r.queues), list(r.queues)
    assert poll(lambda: health_status(srv) == NOT_SERVING, 5), "health still SERVING on an isolated device"
    for i in range(3):
        o = compress(stub, timeout=30)
        expect_unavailable(o, "isolated", within_s=2.0, what=f"call {i + 1} on an isolated device")
    # cooldown 0: the isolation lasts until restart.
    time.sleep(1)
    assert describe(stub).device.isolated
    assert health_status(srv) == NOT_SERVING
    assert_alive(srv, "isolation")


# ----------------------------------------------------------------------------------------
# 4. Faults changed at run time on a standalone daemon


def test_daemon_fault_control_stall_and_clear(daemons, start_server):
    dev = daemons("--allow-fault-control", *DEVICE, label="control")
    gw = start_server("--device", dev.address, *FAST_WATCHDOG, label="control-gateway")
    stub = gw.new_stub()
    assert_round_trip(compress(stub), what="before any fault")
    st = device_status(dev)
    for key in ("isolated", "queueErrors", "resets", "isolations", "fault"):
        assert key in st, f"status lacks {key!r}: {st}"
    assert st["fault"] == "none" and st["isolated"] is False, st

    assert inject(dev, "stall").get("fault") == "stall"
    assert device_status(dev)["fault"] == "stall"
    o = compress(stub, timeout=60)
    expect_unavailable(o, "no completion within", what="daemon stalled at run time")
    dev.wait_log(r"set fault injection to stall")

    assert inject(dev, "none").get("fault") == "none"
    took = wait_serving_call(stub, 10, "after clearing the stall")
    assert took < 10
    for i in range(5):
        assert_round_trip(compress(stub, timeout=10), what=f"call {i + 1} after clearing the stall")
    st = device_status(dev)
    assert st["fault"] == "none" and st["resets"] >= 1, st
    assert dev.alive() and gw.alive()


def test_daemon_without_fault_control_refuses_inject(daemons, start_server):
    dev = daemons(*DEVICE, label="no-control")
    with control(dev) as c:
        for msg in ({"op": "inject", "fault": "stall"}, {"op": "inject", "fault": "none"}, {"op": "lift-isolation"}):
            reply = c.ask(msg)
            assert reply.get("ok") is False, f"{msg} accepted without --allow-fault-control: {reply}"
            assert "--allow-fault-control" in (reply.get("error") or ""), f"{msg} -> {reply}"
        st = c.ask({"op": "status"})
    assert st.get("ok") is True and st.get("fault") == "none", st
    # And nothing changed: a gateway on it serves.
    gw = start_server("--device", dev.address, label="no-control-gateway")
    assert_round_trip(compress(gw.new_stub()), what="on a daemon that refused inject")


# ----------------------------------------------------------------------------------------
# 5. Software fallback


def test_software_fallback_serves_while_the_daemon_is_down(start_server):
    path = os.path.join(short_tmpdir(), "dev.sock")
    first = DeviceDaemon(path, DEVICE, label="fallback-first").start()
    second = None
    try:
        gw = start_server("--device", f"unix://{path}", "--software-fallback", label="fallback-gateway")
        stub = gw.new_stub()
        assert_round_trip(compress(stub), what="on the daemon")
        r = describe(stub)
        assert not r.device.degraded and r.device.mode == "external", r.device

        first.kill()
        first.expected_death = True
        wait_serving_call(stub, 5, "after kill -9 of the daemon")
        for i in range(5):
            assert_round_trip(compress(stub, timeout=10), what=f"call {i + 1} on the software fallback")
        r = describe(stub)
        assert r.device.degraded, f"not degraded with the daemon down: {r.device}"
        assert r.device.status_detail, f"degraded without a status_detail: {r.device}"
        assert health_status(gw) == SERVING

        second = DeviceDaemon(path, DEVICE, label="fallback-second").start()
        back = poll(lambda: not describe(stub).device.degraded, 10, interval=0.2)
        assert back, f"still degraded 10 s after the daemon returned: {describe(stub).device}"
        r = describe(stub)
        assert not r.device.status_detail and r.device.healthy, r.device
        for i in range(3):
            assert_round_trip(compress(stub, timeout=10), what=f"call {i + 1} back on the daemon")
        assert health_status(gw) == SERVING
        # The gateway really is back on the daemon: it holds the daemon's queues.
        with control(second) as c:
            assert c.capabilities().get("queues", 0) >= 1
    finally:
        first.kill()
        first.expected_death = True
        first.stop()
        if second is not None:
            second.stop()


def test_software_fallback_starts_without_a_daemon(start_server):
    path = os.path.join(short_tmpdir(), "dev.sock")  # nothing listens here
    gw = start_server("--device", f"unix://{path}", "--software-fallback", label="fallback-no-daemon")
    stub = gw.new_stub()
    r = describe(stub)
    assert r.device.degraded, f"not degraded without a daemon: {r.device}"
    assert r.device.status_detail, r.device
    for fmt in (GZIP, ZLIB, DEFLATE):
        assert_round_trip(compress(stub, fmt=fmt, timeout=10), fmt=fmt, what="with no daemon")
    assert health_status(gw) == SERVING


def test_a_stream_whose_queue_fails_ends_unavailable_and_a_new_stream_works(daemons, start_server):
    """A DecompressStream is pinned to the queue holding its context and is never
    retried elsewhere: when that queue starts failing mid-stream the call ends with
    UNAVAILABLE (not a hang, not wrong bytes), and once the fault clears a new stream
    goes through."""
    import threading
    dev = daemons("--allow-fault-control", *DEVICE, label="stream-fault")
    gw = start_server("--device", dev.address, *FAST_WATCHDOG, label="stream-fault-gateway")
    stub = gw.new_stub()
    data = text_bytes(4 << 20, seed=72)
    blob = gzip.compress(data, 6)
    piece = 64 * KiB
    first_output = threading.Event()

    def requests():
        yield pb.DecompressStreamRequest(format=GZIP, data=blob[:piece])
        assert first_output.wait(30), "no output for the first chunk"
        inject(dev, "error")
        for off in range(piece, len(blob), piece):
            yield pb.DecompressStreamRequest(data=blob[off:off + piece], final=off + piece >= len(blob))

    out = bytearray()
    with pytest.raises(grpc.RpcError) as e:
        for r in stub.DecompressStream(requests(), timeout=60):
            out += r.data
            first_output.set()
    assert e.value.code() == UNAVAILABLE, f"{e.value.code()}: {e.value.details()}"
    assert data.startswith(bytes(out)), "the output before the failure is a prefix of the right bytes"
    assert inject(dev, "none").get("fault") == "none"
    wait_serving_call(stub, 20, "after the stream's queue failed")
    # A new stream goes through.
    out = bytearray()
    reqs = [pb.DecompressStreamRequest(format=GZIP, data=blob[:piece])] + [
        pb.DecompressStreamRequest(data=blob[off:off + piece], final=off + piece >= len(blob))
        for off in range(piece, len(blob), piece)]
    for r in stub.DecompressStream(iter(reqs), timeout=60):
        out += r.data
    assert bytes(out) == data
    assert dev.alive() and gw.alive()
