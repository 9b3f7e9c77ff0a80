"""Graceful drain on SIGTERM, as a client sees it.

A slow device (one engine capped at a few MB/s) keeps calls in flight long
enough to send SIGTERM in the middle of them:
* in-flight calls finish with correct results, health turns NOT_SERVING, new
  calls are refused with UNAVAILABLE, and the process exits 0;
* when the grace runs out first, the remaining calls end (none hangs) and the
  process still exits 0.
"""
import concurrent.futures as cf
import gzip
import os
import signal
import time

import grpc

from agstubs_health import health_pb2, health_pb2_grpc
from agtest import GZIP, pb

MiB = 1 << 20
PAYLOAD = (b"drain me gently " * (MiB // 16))[:MiB]


def _compress(stub, timeout=60):
    t0 = time.monotonic()
    try:
        r = stub.Compress(pb.CompressRequest(format=GZIP, level=1, data=PAYLOAD), timeout=timeout)
        return ("OK", r.data, time.monotonic() - t0)
    except grpc.RpcError as e:
        return (e.code().name, e.details(), time.monotonic() - t0)


def _sigterm_and_wait(srv, within_s):
    srv.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    rc = srv.proc.wait(within_s)
    return rc, time.monotonic() - t0


def test_sigterm_lets_in_flight_calls_finish_refuses_new_ones_and_exits_0(start_server):
    # 1 MiB at 8 MB/s is ~0.13 s of device time per call; 6 calls keep the engine busy ~0.8 s.
    srv = start_server("--engines", "1", "--engine-cap-mbps", "8", "--drain-grace-ms", "20000", label="drain")
    stub = srv.new_stub()
    health = health_pb2_grpc.HealthStub(srv.channel())
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    with cf.ThreadPoolExecutor(8) as ex:
        calls = [ex.submit(_compress, stub) for _ in range(6)]
        time.sleep(0.3)  # all six are admitted; most still wait for the engine
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        # New work is refused while the old finishes.
        late = _compress(srv.new_stub(), timeout=10)
        results = [c.result(timeout=60) for c in calls]
    assert late[0] == "UNAVAILABLE", f"a call after SIGTERM got {late[:2]}"
    for code, data, _ in results:
        assert code == "OK", f"an in-flight call ended {code}: {data}"
        assert gzip.decompress(data) == PAYLOAD
    rc = srv.proc.wait(30)
    srv.stopped = True
    assert rc == 0, f"exit status {rc}\n{srv.log_tail()}"
    log = open(srv.log_path, errors="replace").read()
    assert "draining" in log and "drained" in log


def test_health_turns_not_serving_as_the_drain_begins(start_server):
    srv = start_server("--engines", "1", "--engine-cap-mbps", "4", "--drain-grace-ms", "20000", label="drain-health")
    stub = srv.new_stub()
    watch_channel = srv.channel()
    health = health_pb2_grpc.HealthStub(watch_channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    with cf.ThreadPoolExecutor(4) as ex:
        calls = [ex.submit(_compress, stub) for _ in range(3)]  # ~0.75 s of device time
        time.sleep(0.2)
        srv.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert all(c.result(timeout=60)[0] == "OK" for c in calls)
    assert srv.proc.wait(30) == 0
    srv.stopped = True


def test_a_grace_that_runs_out_ends_the_remaining_calls_and_still_exits_0(start_server):
    # 12 calls at 2 MB/s need ~6 s of device time; the grace is 0.5 s.
    srv = start_server("--engines", "1", "--engine-cap-mbps", "2", "--drain-grace-ms", "500", label="drain-short")
    stub = srv.new_stub()
    with cf.ThreadPoolExecutor(12) as ex:
        calls = [ex.submit(_compress, stub) for _ in range(12)]
        time.sleep(0.5)
        rc, took = _sigterm_and_wait(srv, 20)
        results = [c.result(timeout=30) for c in calls]
    srv.stopped = True
    assert rc == 0, f"exit status {rc}\n{srv.log_tail()}"
    assert took < 10, f"exit took {took:.1f} s with a 0.5 s grace"
    codes = [r[0] for r in results]
    assert "OK" in codes, codes  # what fit in the grace finished
    assert set(codes) - {"OK"}, f"every call finished inside a 0.5 s grace? {codes}"
    assert set(codes) <= {"OK", "CANCELLED", "UNAVAILABLE"}, codes


def test_a_drain_delay_reports_not_serving_while_still_serving_then_refuses(start_server):
    """--drain-delay-ms: readiness probes and balancers see NOT_SERVING first; calls
    are refused only after the delay (the Kubernetes manifests use 5 s)."""
    srv = start_server("--drain-delay-ms", "2000", "--drain-grace-ms", "5000", label="drain-delay")
    health = health_pb2_grpc.HealthStub(srv.channel())
    stub = srv.new_stub()
    srv.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    time.sleep(0.2)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
    served = _compress(stub, timeout=10)
    assert served[0] == "OK" and time.monotonic() - t0 < 1.8, served[:2]
    assert gzip.decompress(served[1]) == PAYLOAD
    rc = srv.proc.wait(30)
    srv.stopped = True
    assert rc == 0 and time.monotonic() - t0 >= 1.5
