"""Weighted fair sharing of the device between tenants.

Three tenants with weights 1:2:4 keep a one-engine device (8 MB/s: 128-256 KiB
jobs take 16-33 ms) saturated, each with 6 closed-loop callers. Device time is
summed per tenant from JobStats.device_ns of the calls that finish in the middle
of the run (after every tenant is backlogged, before the callers wind down).

With the fair scheduler the shares must follow the weights; with `--scheduler
fifo` the same load must not (equal callers give roughly equal shares), which
shows that the measurement can tell the two apart.
"""
import os
import random
import threading
import time

from agtest import GZIP, KiB, Tenant, call, new_key, pb, write_tenants

WEIGHTS = {"light": 1, "medium": 2, "heavy": 4}
TENANTS = [Tenant(name, [new_key(name)], weight=w) for name, w in WEIGHTS.items()]
CALLERS_PER_TENANT = 6
RUN_S = 6.0
WARMUP_S = 1.0
COOLDOWN_S = 0.75
TOLERANCE = 0.25  # relative
DEVICE = ("--queues", 1, "--engines", 1, "--in-flight-per-queue", 1, "--engine-cap-mbps", 8)
_POOL = os.urandom(256 * KiB + 4096)  # random data: device time is proportional to input


def _run(srv):
    """Drives all tenants for RUN_S; returns ({tenant: device ns in the window}, failures, calls)."""
    device_ns = {t.id: 0 for t in TENANTS}
    calls = {t.id: 0 for t in TENANTS}
    failures = []
    lock = threading.Lock()
    ready = threading.Barrier(len(TENANTS) * CALLERS_PER_TENANT + 1)
    go = threading.Event()
    clock = {}

    def caller(tenant, seed):
        stub = srv.new_stub()  # own connection per caller
        rng = random.Random(seed)
        ready.wait(30)
        go.wait(30)
        while time.monotonic() < clock["stop"]:
            size = rng.randint(128 * KiB, 256 * KiB)
            off = rng.randrange(4096)
            o = call(stub.Compress, pb.CompressRequest(format=GZIP, data=_POOL[off:off + size], level=1),
                     timeout=30, metadata=tenant.md)
            done = time.monotonic()
            with lock:
                if not o.ok:
                    failures.append(f"{tenant.id}: {o.describe()}")
                    continue
                calls[tenant.id] += 1
                if clock["lo"] <= done < clock["hi"]:
                    device_ns[tenant.id] += o.response.stats.device_ns

    threads = [threading.Thread(target=caller, args=(t, i * 100 + j))
               for i, t in enumerate(TENANTS) for j in range(CALLERS_PER_TENANT)]
    for th in threads:
        th.start()
    ready.wait(30)
    start = time.monotonic()
    clock.update(stop=start + RUN_S, lo=start + WARMUP_S, hi=start + RUN_S - COOLDOWN_S)
    go.set()
    for th in threads:
        th.join(60)
    return device_ns, failures, calls


def _shares(device_ns):
    total = sum(device_ns.values())
    assert total > 0, "no device time was recorded in the measurement window"
    return {k: v / total for k, v in device_ns.items()}, total


def _server(start_server, tmp_path, scheduler):
    path = write_tenants(str(tmp_path / "tenants.yaml"), TENANTS)
    return start_server("--tenants", path, "--scheduler", scheduler, *DEVICE, label=scheduler)


def _fmt(shares):
    return ", ".join(f"{k} {v:.1%}" for k, v in shares.items())


def test_fair_scheduler_shares_follow_weights(start_server, tmp_path):
    srv = _server(start_server, tmp_path, "fair")
    device_ns, failures, calls = _run(srv)
    assert not failures, f"{len(failures)} calls failed: {failures[:3]}"
    shares, total = _shares(device_ns)
    print(f"fair: {_fmt(shares)}; device {total / 1e9:.2f} s; calls {calls}")
    window = RUN_S - WARMUP_S - COOLDOWN_S
    # The device must have been kept busy, or nobody was backlogged and shares mean nothing.
    assert total / 1e9 > 0.6 * window, \
        f"only {total / 1e9:.2f} s of device time in a {window:.2f} s window: the device was not saturated"
    wsum = sum(WEIGHTS.values())
    for name, w in WEIGHTS.items():
        want = w / wsum
        assert abs(shares[name] - want) <= TOLERANCE * want, \
            f"fair: {name} (weight {w}) got {shares[name]:.1%} of device time, expected {want:.1%} " \
            f"+-{TOLERANCE:.0%}; shares: {_fmt(shares)}; calls: {calls}"


def test_fifo_shares_do_not_follow_weights(start_server, tmp_path):
    srv = _server(start_server, tmp_path, "fifo")
    device_ns, failures, calls = _run(srv)
    assert not failures, f"{len(failures)} calls failed: {failures[:3]}"
    shares, total = _shares(device_ns)
    print(f"fifo: {_fmt(shares)}; device {total / 1e9:.2f} s; calls {calls}")
    # Equal callers per tenant and arrival order: about a third each.
    assert shares["heavy"] < 0.45, f"fifo gave the weight-4 tenant {shares['heavy']:.1%}: {_fmt(shares)}"
    assert shares["light"] > 0.2, f"fifo gave the weight-1 tenant only {shares['light']:.1%}: {_fmt(shares)}"
