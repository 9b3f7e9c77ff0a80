"""Prometheus metrics as an outside scraper sees them.

* /metrics over plain HTTP, parsed with prometheus_client's own text parser;
* `promtool check metrics` (the Prometheus project's linter) on a real scrape;
* a real Prometheus server scraping the gateway, queried through its HTTP API.
"""
import gzip
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import grpc
import pytest

from agtest import GZIP, ZLIB, pb

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} for every sample line."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        if "{" in head:
            name, rest = head.split("{", 1)
            labels = frozenset(tuple(kv.split("=", 1)) for kv in _split_labels(rest.rstrip("}")))
            labels = frozenset((k, v.strip('"')) for k, v in labels)
        else:
            name, labels = head, frozenset()
        out[(name, labels)] = float(value)
    return out


def _split_labels(s: str):
    parts, cur, quoted = [], "", False
    for ch in s:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return parts


def value(text: str, name: str, **labels) -> float:
    want = frozenset(labels.items())
    found = [v for (n, l), v in samples(text).items() if n == name and want <= l]
    assert found, f"no sample {name}{labels} in:\n{text}"
    return sum(found)


@pytest.fixture(scope="module")
def gateway(start_module_server):
    return start_module_server("--engines", "1", "--idle-spin-us", "10", label="metrics")


def test_metrics_endpoint_counts_calls_jobs_and_device_time(gateway):
    stub = gateway.new_stub()
    data = b"prometheus scrapes this " * 4000
    before = scrape(gateway.metrics_port)
    ok0 = samples(before).get(("accelgate_requests_total",
                               frozenset({("method", "Compress"), ("code", "OK"), ("tenant", "default")})), 0)
    for _ in range(5):
        r = stub.Compress(pb.CompressRequest(format=GZIP, level=1, data=data), timeout=30)
        assert gzip.decompress(r.data) == data
    with pytest.raises(grpc.RpcError) as e:
        stub.Decompress(pb.DecompressRequest(format=GZIP, data=b"not gzip"), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    text = scrape(gateway.metrics_port)
    assert value(text, "accelgate_requests_total", method="Compress", code="OK", tenant="default") == ok0 + 5
    assert value(text, "accelgate_requests_total", method="Decompress", code="INVALID_ARGUMENT") >= 1
    assert value(text, "accelgate_jobs_total", operation="compress", outcome="ok") >= 5
    assert value(text, "accelgate_device_seconds_total", tenant="default") > 0
    assert value(text, "accelgate_job_bytes_total", tenant="default", direction="in") >= 5 * len(data)
    assert value(text, "accelgate_request_duration_seconds_count", method="Compress") >= 5
    assert value(text, "accelgate_request_duration_seconds_bucket", method="Compress", le="+Inf") >= 5
    assert value(text, "accelgate_queue_completions_total") >= 6
    assert value(text, "accelgate_engine_busy_seconds_total", engine="0") > 0
    assert value(text, "accelgate_device_attached") == 1
    assert value(text, "accelgate_degraded") == 0
    # Every HELP/TYPE pair is present for what is exposed.
    for name in ("accelgate_requests_total", "accelgate_queue_wait_seconds", "accelgate_jobs_queued"):
        assert f"# TYPE {name} " in text, name
        assert f"# HELP {name} " in text, name


def test_unauthenticated_calls_are_counted(start_server, tmp_path):
    tenants = tmp_path / "tenants.yaml"
    import hashlib
    tenants.write_text("tenants:\n  - { id: t1, api_key_sha256: [%s] }\n" % hashlib.sha256(b"k1").hexdigest())
    srv = start_server("--tenants", str(tenants), "--engines", "1", label="metrics-auth")
    stub = srv.new_stub()
    with pytest.raises(grpc.RpcError) as e:
        stub.Compress(pb.CompressRequest(format=GZIP, data=b"x"), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    stub.Compress(pb.CompressRequest(format=GZIP, data=b"x"), timeout=10,
                  metadata=[("authorization", "Bearer k1")])
    text = scrape(srv.metrics_port)
    assert value(text, "accelgate_unauthenticated_total") == 1
    assert value(text, "accelgate_requests_total", method="Compress", code="OK", tenant="t1") == 1


def test_other_paths_are_404_and_healthz_is_ok(gateway):
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/healthz", timeout=10) as r:
        assert r.read() == b"ok\n"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/nope", timeout=10)
    assert e.value.code == 404


def test_promtool_accepts_the_exposition(gateway):
    assert PROMTOOL, "promtool is missing: scripts/install-deps.sh test installs the prometheus package"
    stub = gateway.new_stub()
    stub.Compress(pb.CompressRequest(format=ZLIB, data=b"lint me" * 100), timeout=30)
    text = scrape(gateway.metrics_port)
    p = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert p.returncode == 0, (p.stdout + p.stderr).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port: int, q: str):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_a_real_prometheus_server_scrapes_the_gateway(gateway):
    assert PROMETHEUS, "prometheus is missing: scripts/install-deps.sh test installs it"
    stub = gateway.new_stub()
    for _ in range(3):
        stub.Compress(pb.CompressRequest(format=GZIP, data=b"scraped by prometheus " * 500), timeout=30)
    work = tempfile.mkdtemp(prefix="agprom-")
    port = _free_port()
    config = os.path.join(work, "prometheus.yml")
    with open(config, "w") as f:
        f.write(f"""
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: accelgate
    static_configs:
      - targets: ['127.0.0.1:{gateway.metrics_port}']
""")
    check = subprocess.run([PROMTOOL, "check", "config", config], capture_output=True) if PROMTOOL else None
    assert check is None or check.returncode == 0, check.stdout + check.stderr
    log = open(os.path.join(work, "prometheus.log"), "wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={work}/data",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        up = ok = None
        while time.monotonic() < deadline:
            time.sleep(1)
            try:
                up = _query(port, 'up{job="accelgate"}')
                ok = _query(port, 'sum(accelgate_requests_total{method="Compress",code="OK"})')
            except (OSError, urllib.error.URLError):
                continue
            if up and ok and float(ok[0]["value"][1]) >= 3:
                break
        assert up and float(up[0]["value"][1]) == 1, f"target not up: {up}\n{open(log.name).read()[-2000:]}"
        assert ok and float(ok[0]["value"][1]) >= 3, ok
        # A rate over the histogram works, i.e. buckets are well-formed for PromQL.
        q = _query(port, 'histogram_quantile(0.99, sum by (le) (accelgate_request_duration_seconds_bucket))')
        assert q, "histogram_quantile returned nothing"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_grafana_dashboard_only_queries_metrics_the_gateway_exports(gateway):
    import re
    stub = gateway.new_stub()
    stub.Compress(pb.CompressRequest(format=GZIP, data=b"dashboard" * 100), timeout=30)
    exported = {n for (n, _) in samples(scrape(gateway.metrics_port))}
    with open(os.path.join(ROOT, "deploy", "grafana", "accelgate.json")) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    used = {m for e in exprs for m in re.findall(r"\baccelgate_[a-z_]+", e)}
    missing = sorted(m for m in used if m not in exported)
    assert not missing, f"dashboard queries metrics the gateway does not export: {missing}"


def test_the_shipped_prometheus_config_is_valid():
    assert PROMTOOL, "promtool is missing: scripts/install-deps.sh test installs the prometheus package"
    p = subprocess.run([PROMTOOL, "check", "config", os.path.join(ROOT, "deploy", "prometheus", "prometheus.yml")],
                       capture_output=True, timeout=60)
    assert p.returncode == 0, (p.stdout + p.stderr).decode()
