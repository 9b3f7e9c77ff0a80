"""Connection hygiene and the gateway-wide payload memory budget."""
import concurrent.futures as cf
import threading
import time

import grpc

from agtest import GZIP, pb


def test_the_gateway_memory_budget_refuses_with_a_retry_hint(start_server):
    # One slow engine (1 MB/s): 100 KB jobs pile up; the budget holds about three of them.
    srv = start_server("--engines", "1", "--engine-cap-mbps", "1", "--max-queued-payload-bytes", "300000",
                       "--tenant-max-queued-jobs", "1000", label="memory-budget")
    stub = srv.new_stub()
    data = b"m" * 100_000

    def call():
        try:
            stub.Compress(pb.CompressRequest(format=GZIP, level=1, data=data), timeout=60)
            return ("OK", None)
        except grpc.RpcError as e:
            return (e.code().name, dict(e.trailing_metadata() or ()))

    with cf.ThreadPoolExecutor(12) as ex:
        results = list(ex.map(lambda _: call(), range(12)))
    codes = [c for c, _ in results]
    assert "OK" in codes, codes
    refused = [md for c, md in results if c == "RESOURCE_EXHAUSTED"]
    assert refused, f"nothing refused with 1.2 MB offered against a 300 kB budget: {codes}"
    assert all(md.get("rejection-reason") == "gateway_memory" and int(md["retry-after-ms"]) > 0 for md in refused), refused
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes


def test_idle_connections_are_closed_and_clients_reconnect(start_server):
    srv = start_server("--engines", "1", "--max-connection-idle-ms", "500", label="idle")
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    states = []
    seen_idle = threading.Event()

    def watch(state):
        states.append(state)
        if state == grpc.ChannelConnectivity.IDLE and grpc.ChannelConnectivity.READY in states:
            seen_idle.set()

    channel.subscribe(watch, try_to_connect=False)
    from accelgate.v1 import accelerator_pb2_grpc as g
    stub = g.AcceleratorStub(channel)
    stub.Compress(pb.CompressRequest(format=GZIP, data=b"idle"), timeout=10)
    assert seen_idle.wait(10), f"the server never closed the idle connection: {states}"
    stub.Compress(pb.CompressRequest(format=GZIP, data=b"back"), timeout=10)  # reconnects transparently
    channel.unsubscribe(watch)
    channel.close()
