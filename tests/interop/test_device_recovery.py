"""A standalone device killed with SIGKILL under load: every call ends with a
clear status within seconds (none hangs), health reports it, and service
resumes by itself when the daemon restarts on the same socket."""
import concurrent.futures as cf
import os
import time

import grpc

from agtest import pb
from daemonhelp import DeviceDaemon, short_tmpdir


def _compress(stub, size=256 * 1024, timeout=20.0):
    t0 = time.monotonic()
    try:
        stub.Compress(pb.CompressRequest(format=pb.COMPRESSION_FORMAT_GZIP, level=1, data=os.urandom(size)),
                      timeout=timeout)
        return "OK", time.monotonic() - t0
    except grpc.RpcError as e:
        return e.code().name, time.monotonic() - t0


def test_kill_9_of_the_daemon_under_load_fails_fast_and_recovers(start_server):
    path = os.path.join(short_tmpdir(), "dev.sock")
    # Slow engine (2 MB/s): 256 KiB jobs take ~130 ms, so work is in flight at the kill.
    first = DeviceDaemon(path, ("--engines", "1", "--engine-cap-mbps", "2"), label="recovery-first").start()
    second = None
    try:
        gw = start_server("--device", f"unix://{path}", "--queues", "1", label="recovery-gateway")
        stub = gw.new_stub()
        assert _compress(stub, 1024)[0] == "OK"
        with cf.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(_compress, stub) for _ in range(16)]
            time.sleep(0.4)
            killed_at = time.monotonic()
            first.kill()
            outcomes = [f.result(timeout=30) for f in futures]
        codes = {code for code, _ in outcomes}
        # Every call ended with a clear status, none by running into its 20 s deadline.
        assert codes <= {"OK", "UNAVAILABLE"}, outcomes
        assert "UNAVAILABLE" in codes, outcomes
        assert time.monotonic() - killed_at < 8, "calls took too long to fail after the kill"

        # While the daemon is down: new calls fail at once, and the device reports unhealthy.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and stub.DescribeDevice(pb.DescribeDeviceRequest()).device.healthy:
            time.sleep(0.1)
        assert not stub.DescribeDevice(pb.DescribeDeviceRequest()).device.healthy
        code, took = _compress(stub, 1024)
        assert code == "UNAVAILABLE" and took < 2, (code, took)

        # The daemon comes back on the same socket: the gateway reattaches by itself.
        second = DeviceDaemon(path, ("--engines", "1"), label="recovery-second").start()
        deadline = time.monotonic() + 15
        ok = False
        while time.monotonic() < deadline and not ok:
            ok = _compress(stub, 1024)[0] == "OK"
            if not ok:
                time.sleep(0.2)
        assert ok, "the gateway did not reattach to the restarted daemon"
        assert stub.DescribeDevice(pb.DescribeDeviceRequest()).device.healthy
        assert all(_compress(stub, 64 * 1024)[0] == "OK" for _ in range(5))
    finally:
        first.kill()
        if second is not None:
            second.stop()
