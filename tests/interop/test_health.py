"""grpc.health.v1 Check and Watch follow the device: SERVING while it is
attached, NOT_SERVING while a standalone device is down, SERVING again after
it returns. Health needs no API key."""
import os
import queue
import threading
import time

import grpc

from agstubs_health import health_pb2, health_pb2_grpc
from daemonhelp import DeviceDaemon, short_tmpdir

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def _health(address):
    return health_pb2_grpc.HealthStub(grpc.insecure_channel(address))


def test_check_and_watch_on_the_embedded_device(server):
    h = _health(server.address)
    for name in ("", "accelgate.v1.Accelerator"):
        assert h.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == SERVING
    try:
        h.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        raise AssertionError("unknown service accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND
    stream = h.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert next(stream).status == SERVING
    stream.cancel()
    unknown = h.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert next(unknown).status == SERVICE_UNKNOWN
    unknown.cancel()


def test_health_needs_no_key_when_tenants_are_configured(start_server, tmp_path):
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("tenants:\n  - id: a\n    api_key_sha256: [" + "ab" * 32 + "]\n")
    srv = start_server("--tenants", str(tenants), label="health-tenants")
    assert _health(srv.address).Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING


def test_watch_follows_a_device_outage_and_return(start_server):
    path = os.path.join(short_tmpdir(), "dev.sock")
    first = DeviceDaemon(path, ("--engines", "1"), label="health-first").start()
    second = None
    try:
        gw = start_server("--device", f"unix://{path}", "--queues", "1", label="health-gateway")
        h = _health(gw.address)
        seen = queue.Queue()
        stream = h.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)

        def pump():
            try:
                for msg in stream:
                    seen.put(msg.status)
            except grpc.RpcError:
                pass

        threading.Thread(target=pump, daemon=True).start()
        assert seen.get(timeout=5) == SERVING
        first.kill()
        assert seen.get(timeout=5) == NOT_SERVING, "Watch did not report the outage"
        assert h.Check(health_pb2.HealthCheckRequest(), timeout=5).status == NOT_SERVING
        second = DeviceDaemon(path, ("--engines", "1"), label="health-second").start()
        assert seen.get(timeout=15) == SERVING, "Watch did not report the recovery"
        assert h.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        stream.cancel()
    finally:
        first.kill()
        if second is not None:
            second.stop()
