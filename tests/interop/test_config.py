"""The main configuration file, environment and flags; check-config's errors;
JSON-lines logs with a request id per call."""
import json
import os
import subprocess
import textwrap

import grpc

from agtest import GZIP, pb
from conftest import ROOT, server_binary


def check(path, env=None):
    return subprocess.run([server_binary(), "check-config", path], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def write(tmp_path, text, name="accelgate.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_the_shipped_example_is_valid_and_lists_every_setting():
    r = check(os.path.join(ROOT, "deploy", "accelgate.yaml"))
    assert r.returncode == 0, r.stderr
    assert "listen.port: 50051" in r.stdout
    assert "device.isolation.threshold: 16" in r.stdout
    assert r.stderr.strip().endswith(": ok")


def test_errors_name_the_file_line_column_and_setting(tmp_path):
    path = write(tmp_path, """\
        listen:
          prot: 50051
        limits:
          max_queued_jobs: -5
        scheduler:
          kind: lottery
        device:
          sq_entries: 100
          isolation:
            threshold: many
        """)
    r = check(path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert f"{path}:2:3: listen.prot: unknown setting (did you mean 'listen.port'?)" in lines, r.stderr
    assert f"{path}:4:20: limits.max_queued_jobs: must be 1...1000000, got -5" in lines, r.stderr
    assert f"{path}:6:9: scheduler.kind: must be one of fair, fifo, got 'lottery'" in lines, r.stderr
    assert f"{path}:8:15: device.sq_entries: must be a power of two in 2...65536, got '100'" in lines, r.stderr
    assert f"{path}:10:16: device.isolation.threshold: expected an integer, got 'many'" in lines, r.stderr
    assert len(lines) == 5, r.stderr


def test_the_retired_edge_settings_are_refused_by_name(tmp_path):
    """listen.edge and listen.core_edge_port chose between grpc-swift and the C core while both served
    (issue 18); the C core is the only edge now, so a file that still sets them is told so, not ignored."""
    path = write(tmp_path, """\
        listen:
          edge: core
          core_edge_port: 0
        """)
    r = check(path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert any(l.startswith(f"{path}:2:3: listen.edge: unknown setting") for l in lines), r.stderr
    assert any(l.startswith(f"{path}:3:3: listen.core_edge_port: unknown setting") for l in lines), r.stderr


def test_yaml_syntax_errors_and_wrong_shapes_are_precise(tmp_path):
    r = check(write(tmp_path, "listen:\n  port: [1, 2\n"))
    assert r.returncode == 1 and "YAML error at line" in r.stderr, r.stderr
    r = check(write(tmp_path, "listen: 5\n", "b.yaml"))
    assert r.returncode == 1 and "listen: expected a mapping" in r.stderr, r.stderr
    r = check(write(tmp_path, "metrics:\n  port: 7\nlisten:\n  port: 7\n", "c.yaml"))
    assert r.returncode == 1 and "metrics.port and listen.port are both 7" in r.stderr, r.stderr
    r = check(str(tmp_path / "missing.yaml"))
    assert r.returncode == 1 and "cannot read" in r.stderr, r.stderr


def test_environment_overrides_the_file_in_check_config(tmp_path):
    path = write(tmp_path, "limits:\n  max_queued_jobs: 77\n")
    r = subprocess.run([server_binary(), "check-config", "--environment", path], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "ACCELGATE_LIMITS_MAX_QUEUED_JOBS": "88"})
    assert r.returncode == 0, r.stderr
    assert "limits.max_queued_jobs: 88" in r.stdout


def test_serve_layers_file_then_environment_then_flags(start_server, tmp_path, monkeypatch):
    path = write(tmp_path, """\
        limits:
          max_queued_jobs: 77
          default_deadline_ms: 12345
        scheduler:
          max_batch: 7
        device:
          engines: 1
        """)
    monkeypatch.setenv("ACCELGATE_LIMITS_DEFAULT_DEADLINE_MS", "23456")
    monkeypatch.setenv("ACCELGATE_SCHEDULER_MAX_BATCH", "9")
    srv = start_server("--config", path, "--max-batch", "11", label="config-layers")
    d = srv.new_stub().DescribeDevice(pb.DescribeDeviceRequest(), timeout=10)
    assert d.limits.max_queued_jobs == 77          # file
    assert d.limits.default_deadline_ms == 23456   # environment over file
    assert d.limits.max_batch == 11                # flag over environment
    assert len(d.engines) == 1
    log = open(srv.log_path, errors="replace").read()
    assert "effective configuration" in log and "limits.max_queued_jobs=77" in log


def test_serve_refuses_a_bad_file_with_the_same_precise_error(tmp_path):
    path = write(tmp_path, "listen:\n  port: 99999\n")
    r = subprocess.run([server_binary(), "serve", "--config", path], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert f"{path}:2:9: listen.port: must be 0...65535, got 99999" in r.stderr, r.stderr
    r = subprocess.run([server_binary(), "serve", "--port", "http"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "command line: listen.port: expected an integer, got 'http'" in r.stderr, r.stderr


def test_json_logs_carry_a_request_id_from_traceparent(start_server):
    srv = start_server("--log-format", "json", "--log-level", "debug", "--engines", "1", label="json-logs")
    stub = srv.new_stub()
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    resp, call = stub.Compress.with_call(
        pb.CompressRequest(format=GZIP, data=b"json logs " * 100), timeout=10,
        metadata=[("traceparent", f"00-{trace}-00f067aa0ba902b7-01")])
    assert dict(call.initial_metadata()).get("x-request-id") == trace
    try:
        stub.Decompress(pb.DecompressRequest(format=GZIP, data=b"junk"), timeout=10,
                        metadata=[("x-request-id", "my-req-42")])
        raise AssertionError("junk decompressed")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(e.trailing_metadata() or ()).get("x-request-id") == "my-req-42", e.trailing_metadata()
    srv.stop()
    events = []
    for line in open(srv.log_path, errors="replace"):
        if line.startswith("{"):
            events.append(json.loads(line))  # every structured line is valid JSON
    assert events, "no JSON log lines"
    assert all({"ts", "level", "label", "msg"} <= set(e) for e in events)
    calls = {e.get("request_id"): e for e in events if e["msg"] == "call"}
    assert calls[trace]["method"] == "Compress" and calls[trace]["code"] == "OK"
    assert calls["my-req-42"]["code"] == "INVALID_ARGUMENT" and calls["my-req-42"]["level"] == "info"
    assert not any("authorization" in json.dumps(e).lower() for e in events)
