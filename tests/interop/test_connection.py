"""One HTTP/2 connection carrying many concurrent calls.

The server's SETTINGS advertise no MAX_CONCURRENT_STREAMS (that is: no limit), so a
client may open as many streams as it likes on one connection; every call must then
get its own answer (a result or a per-call status), never a dropped connection.
"""
import gzip
import os

import grpc

from agtest import GZIP, KiB, call, pb


def test_many_concurrent_calls_on_one_connection(start_server):
    srv = start_server(label="streams")
    stub = srv.stub()  # one channel, one connection
    assert call(stub.DescribeDevice, pb.DescribeDeviceRequest()).ok  # connected, SETTINGS exchanged
    data = os.urandom(KiB)
    n = 300
    futures = [stub.Compress.future(pb.CompressRequest(format=GZIP, data=data, level=1), timeout=60)
               for _ in range(n)]
    outcomes = {}
    for f in futures:
        try:
            assert gzip.decompress(f.result().data) == data
            outcomes["OK"] = outcomes.get("OK", 0) + 1
        except grpc.RpcError as e:
            key = f"{e.code().name}: {e.details()}"
            outcomes[key] = outcomes.get(key, 0) + 1
    dropped = {k: v for k, v in outcomes.items() if k.startswith("UNAVAILABLE")}
    assert not dropped, f"{n} concurrent calls on one connection: {outcomes}"
    # Anything else must be a per-call admission answer.
    assert set(outcomes) <= {"OK"} | {k for k in outcomes if k.startswith("RESOURCE_EXHAUSTED")}, outcomes
    assert outcomes.get("OK", 0) > 0, outcomes
