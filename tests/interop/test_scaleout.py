"""Scale-out on one node, the way deploy/compose and deploy/k8s run AccelGate.

One `accelgate device` daemon, two `accelgate serve` gateways attached to it, and one
grpcio channel that balances calls over both gateways with the round_robin policy
(in Kubernetes the client names `dns:///accelgate.accelgate.svc.cluster.local:50051`,
a headless Service, and gets every ready pod's address; here the two addresses are
given directly with the `ipv4:` scheme). docs/DEPLOY.md describes the deployment.

* Every job through the balanced channel is correct (checked with Python's zlib and
  hashlib), and both gateways serve a fair part of the calls: the client attributes
  each call to a gateway by the device queue that ran it, and each gateway's
  /metrics counts the calls it finished.
* The device arbitrates between the gateways by queue weight (1 and 3) while both
  are backlogged. round_robin gives each gateway the same arrival rate, so a closed
  loop of callers would make both finish at the same rate whatever the device does;
  the load is therefore an open loop at about twice the device's capacity, which
  keeps both gateways' queues full, and the share is measured from the device time
  of the jobs that complete in a window while both are backlogged.
"""
import hashlib
import json
import os
import random
import threading
import time
import urllib.request
import zlib

import grpc
import pytest

from accelgate.v1 import accelerator_pb2_grpc
from agtest import DEFLATE, GZIP, KiB, ZLIB, WBITS, pb, py_compress, text_bytes
from conftest import CHANNEL_OPTIONS
from daemonhelp import DaemonFactory, capabilities

# The service config a client sets for round_robin (docs/DEPLOY.md). With a dns:///
# target the same JSON may come from the resolver; here it is the channel's default.
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


@pytest.fixture
def daemons(request):
    factory = DaemonFactory(request.node.name)
    yield factory
    factory.stop_all()


@pytest.fixture
def gateway(daemons, start_server):
    """gateway(daemon, *flags, label=""); depends on `daemons` first, so gateways stop first."""
    def start(daemon, *flags, label=""):
        return start_server("--device", daemon.address, *flags, label=label)
    return start


def balanced_channel(*gateways):
    """One channel over all gateways' addresses with round_robin."""
    target = "ipv4:" + ",".join(g.address for g in gateways)
    ch = grpc.insecure_channel(target, options=[*CHANNEL_OPTIONS, ("grpc.service_config", ROUND_ROBIN)])
    grpc.channel_ready_future(ch).result(timeout=30)
    return ch


def queue_owner(*gateways):
    """{device queue id: gateway label}, from each gateway's DescribeDevice."""
    owner = {}
    for g in gateways:
        r = g.stub().DescribeDevice(pb.DescribeDeviceRequest(), timeout=30)
        assert r.device.mode == "external" and r.device.healthy, f"gateway {g.label}: {r.device}"
        for q in r.queues:
            assert q.id not in owner, f"queue {q.id} reported by {owner[q.id]} and {g.label}"
            owner[q.id] = g.label
    return owner


def ok_calls(srv) -> int:
    """Calls the gateway finished with OK, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("accelgate_requests_total{") and 'code="OK"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


# ----------------------------------------------------------------------------------------
# 1. Correct results from both gateways through one balanced channel

MIX_CALLS = 96
MIX_WORKERS = 8


def _mixed_job(stub, i, rng):
    """Call i of the mix; returns (queue id, None) or (None, error text)."""
    data = text_bytes(rng.choice([300, 8 * KiB, 48 * KiB, 200 * KiB]), seed=i)
    kind = i % 4
    if kind == 0:
        fmt = (DEFLATE, ZLIB, GZIP)[i % 3]
        r = stub.Compress(pb.CompressRequest(format=fmt, level=rng.randint(1, 9), data=data), timeout=60)
        d = zlib.decompressobj(WBITS[fmt])
        if d.decompress(r.data) + d.flush() != data or not d.eof:
            return None, f"call {i}: compressed output does not decompress to the input"
    elif kind == 1:
        fmt = (DEFLATE, ZLIB, GZIP)[i % 3]
        r = stub.Decompress(pb.DecompressRequest(format=fmt, data=py_compress(fmt, data)), timeout=60)
        if r.data != data:
            return None, f"call {i}: decompressed {len(r.data)} bytes differ from the {len(data)}-byte original"
    elif kind == 2:
        r = stub.Digest(pb.DigestRequest(algorithm=pb.DIGEST_ALGORITHM_SHA256, data=data), timeout=60)
        if r.digest != hashlib.sha256(data).digest():
            return None, f"call {i}: SHA-256 differs from hashlib's"
    else:
        r = stub.Digest(pb.DigestRequest(algorithm=pb.DIGEST_ALGORITHM_CRC32, data=data), timeout=60)
        if r.checksum != zlib.crc32(data):
            return None, f"call {i}: CRC-32 {r.checksum:#x} != {zlib.crc32(data):#x}"
    return r.stats.queue_id, None


def test_round_robin_client_gets_correct_results_from_both_gateways(daemons, gateway):
    dev = daemons("--engines", 2, label="rr")
    g1 = gateway(dev, "--queues", 2, label="g1")
    g2 = gateway(dev, "--queues", 2, label="g2")
    assert capabilities(dev.path)["queues"] == 4
    owner = queue_owner(g1, g2)
    before = {g.label: ok_calls(g) for g in (g1, g2)}

    stub = accelerator_pb2_grpc.AcceleratorStub(balanced_channel(g1, g2))
    served = {g1.label: 0, g2.label: 0}
    failures = []
    lock = threading.Lock()
    next_call = iter(range(MIX_CALLS))

    def worker(seed):
        rng = random.Random(seed)
        while True:
            with lock:
                i = next(next_call, None)
            if i is None:
                return
            try:
                qid, err = _mixed_job(stub, i, rng)
            except grpc.RpcError as e:
                qid, err = None, f"call {i}: {e.code().name}: {e.details()}"
            with lock:
                if err:
                    failures.append(err)
                elif qid not in owner:
                    failures.append(f"call {i} ran on queue {qid}, which neither gateway owns ({owner})")
                else:
                    served[owner[qid]] += 1

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(MIX_WORKERS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not any(th.is_alive() for th in threads), "client threads still running after 120 s"
    assert not failures, f"{len(failures)} of {MIX_CALLS} calls failed: {failures[:5]}"
    assert sum(served.values()) == MIX_CALLS
    print(f"calls per gateway: {served}")
    # round_robin alternates picks; concurrency only blurs the order a little.
    for label, n in served.items():
        assert 0.35 * MIX_CALLS <= n <= 0.65 * MIX_CALLS, \
            f"round_robin sent {n} of {MIX_CALLS} calls to {label}: {served}"
    # Each gateway's own counters agree with what the client saw (a call is counted as
    # it ends, which may be a moment after the client has its response).
    for g in (g1, g2):
        deadline = time.monotonic() + 5
        while (got := ok_calls(g) - before[g.label]) < served[g.label] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got >= served[g.label], \
            f"gateway {g.label} /metrics counts {got} OK calls, the client got {served[g.label]} from it"
    assert dev.alive()


# ----------------------------------------------------------------------------------------
# 2. The shared device's arbitration follows the gateways' queue weights

WEIGHTS = {"A": 1, "B": 3}
JOB = 128 * KiB
CAP_MBPS = 8                       # one engine: 128 KiB is ~16 ms, ~61 jobs/s
CAPACITY_JOBS_S = CAP_MBPS * 1e6 / JOB
RATE = 2.0 * CAPACITY_JOBS_S       # each gateway gets ~1x capacity: both stay backlogged
SEND_S = 3.5
WINDOW = (1.25, 3.5)               # completions in this window count
TOLERANCE = 0.25                   # relative, on B's share
# Up to 8 descriptors and 200 ms of estimated device time on each gateway's queue (the
# default 2 ms budget would keep one 16 ms job there, and weights could not show); room
# for the backlog the open loop builds (about 0.75 x capacity x SEND_S jobs at A).
GATEWAY_FLAGS = ("--queues", 1, "--in-flight-per-queue", 8, "--in-flight-budget-us", 200_000,
                 "--tenant-max-queued-jobs", 1024, "--max-queued-jobs", 2048)
_POOL = os.urandom(JOB + 4096)     # random data: every job costs the same at the cap


def test_shared_device_splits_time_between_gateways_by_queue_weight(daemons, gateway):
    dev = daemons("--engines", 1, "--engine-cap-mbps", CAP_MBPS, label="wrr")
    gws = {name: gateway(dev, "--queue-weight", w, *GATEWAY_FLAGS, label=f"{name}-w{w}") for name, w in WEIGHTS.items()}
    owner = queue_owner(*gws.values())
    name_of = {g.label: name for name, g in gws.items()}
    stub = accelerator_pb2_grpc.AcceleratorStub(balanced_channel(*gws.values()))
    # Warm both connections (round_robin alternates, so two calls touch both).
    for _ in range(4):
        stub.Compress(pb.CompressRequest(format=GZIP, level=1, data=_POOL[:4096]), timeout=30)

    lock = threading.Lock()
    device_ns = {name: 0 for name in gws}
    completed = {name: 0 for name in gws}
    failures = []
    futures = []
    all_done = threading.Condition(lock)
    pending = [0]

    def on_done(fut, off, start):
        finished = time.monotonic() - start
        try:
            r = fut.result()
            err = None
            if zlib.decompress(r.data, 31) != _POOL[off:off + JOB]:
                err = f"job at offset {off}: gzip output does not decompress to the input"
            elif r.stats.queue_id not in owner:
                err = f"job ran on queue {r.stats.queue_id}, which neither gateway owns"
        except grpc.RpcError as e:
            r, err = None, f"{e.code().name}: {e.details()}"
        except Exception as e:  # noqa: BLE001 - a checking error is a failure, not a lost callback
            r, err = None, f"{type(e).__name__}: {e}"
        with lock:
            pending[0] -= 1
            if err:
                failures.append(err)
            else:
                name = name_of[owner[r.stats.queue_id]]
                completed[name] += 1
                if WINDOW[0] <= finished < WINDOW[1]:
                    device_ns[name] += r.stats.device_ns
            all_done.notify_all()

    rng = random.Random(7)
    start = time.monotonic()
    sent = 0
    while True:
        due = start + sent / RATE
        now = time.monotonic()
        if due - start >= SEND_S:
            break
        if due > now:
            time.sleep(due - now)
        off = rng.randrange(4096)
        with lock:
            pending[0] += 1
        fut = stub.Compress.future(pb.CompressRequest(format=GZIP, level=1, data=_POOL[off:off + JOB]), timeout=60)
        fut.add_done_callback(lambda f, off=off: on_done(f, off, start))
        futures.append(fut)
        sent += 1
    issue_lag = time.monotonic() - start - SEND_S
    with lock:
        all_done.wait_for(lambda: pending[0] == 0, timeout=60)
        left = pending[0]
    assert left == 0, f"{left} of {sent} calls still unanswered 60 s after the last was sent"
    assert not failures, f"{len(failures)} of {sent} calls failed: {failures[:3]}"
    assert sum(completed.values()) == sent

    window = WINDOW[1] - WINDOW[0]
    total = sum(device_ns.values())
    share_b = device_ns["B"] / total if total else 0.0
    print(f"sent {sent} at {RATE:.0f}/s (issue lag {issue_lag * 1000:.0f} ms); completed {completed}; "
          f"device time in the {window:.2f} s window {total / 1e9:.2f} s; "
          f"B (weight 3) share {share_b:.1%}, A (weight 1) share {1 - share_b:.1%}")
    # round_robin alternates, so both gateways got the same number of calls.
    assert abs(completed["A"] - completed["B"]) <= max(2, 0.05 * sent), \
        f"round_robin split the calls unevenly: {completed}"
    # The one engine was kept busy, or nobody was backlogged and shares mean nothing.
    # (Not 100 %: device_ns is the modeled time at the cap; the pacing sleeps overshoot it.)
    assert total / 1e9 > 0.5 * window, \
        f"only {total / 1e9:.2f} s of device time in a {window:.2f} s window: the device was not saturated"
    want = WEIGHTS["B"] / sum(WEIGHTS.values())
    assert abs(share_b - want) <= TOLERANCE * want, \
        f"gateway B (queue weight 3) got {share_b:.1%} of the device time against gateway A (weight 1) while " \
        f"both were backlogged, expected {want:.0%} +-{TOLERANCE:.0%} relative; device ns {device_ns}"
    for g in gws.values():
        assert g.alive()
    assert dev.alive()
