"""The C client library (clients/c) against live servers.

Builds clients/c if needed (make test has done it already), then runs the
ASan/UBSan/LSan build of the C test program (clients/c/build/asan/client_test),
one section per test, with the server address, API keys and TLS files in its
environment. Each run must exit 0 with no sanitizer report on stderr. The C
program checks results itself against zlib, libzstd, liblz4 and OpenSSL; here
its gzip, zstd and lz4 output, and the example program's chunked output, are
also checked with Python's gzip, zstandard and lz4.
"""
import gzip
import io
import os
import socket
import subprocess
import zlib

import lz4.frame
import pytest
import zstandard

from agtest import KiB, MiB, Tenant, new_key, text_bytes, write_tenants
from conftest import ROOT
from cryptohelp import KeyVersion, NamedKey, write_keyring
from pkihelp import write_pki

CDIR = os.path.join(ROOT, "clients", "c")
ASAN_BUILD = os.path.join(CDIR, "build", "asan")
CLIENT_TEST = os.path.join(ASAN_BUILD, "client_test")
EXAMPLE = os.path.join(ASAN_BUILD, "accelgate-compress")
TENANT = "c-client"
RUN_TIMEOUT_S = 120

# LeakSanitizer runs at exit (detect_leaks). gRPC core needs no suppressions: the
# library shuts it down (grpc_shutdown in accelgate_client_close). The one entry in
# lsan.supp is for c-ares, which leaks when it resolves "localhost".
LSAN_SUPP = os.path.join(CDIR, "tests", "lsan.supp")
SAN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:abort_on_error=0:strict_string_checks=1:"
                    "detect_stack_use_after_return=1:check_initialization_order=1",
    "LSAN_OPTIONS": f"suppressions={LSAN_SUPP}",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}
SAN_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:", "SUMMARY: ")


@pytest.fixture(scope="module")
def built():
    """make -C clients/c (a no-op after `make test`'s c-client step)."""
    r = subprocess.run(["make", "-C", CDIR], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"building clients/c failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    for path in (CLIENT_TEST, EXAMPLE):
        assert os.access(path, os.X_OK), f"{path} was not built"


@pytest.fixture(scope="module")
def closed_port():
    """A local port that refuses connections: bound, never listening, held for the module."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


@pytest.fixture(scope="module")
def tenant_server(start_module_server, tmp_path_factory):
    """A server with a tenants file and a keyring holding one named AES-256-GCM key of the tenant."""
    d = tmp_path_factory.mktemp("c-client")
    key = new_key("c")
    named = NamedKey("orders", "aes-256-gcm", [KeyVersion(1, os.urandom(32))], tenant=TENANT)
    tenants = write_tenants(str(d / "tenants.yaml"), [Tenant(TENANT, [key])])
    keyring = write_keyring(str(d / "keyring.yaml"), [named])
    srv = start_module_server("--tenants", tenants, "--keyring", keyring, label="c-client")
    return srv, key, named


@pytest.fixture(scope="module")
def pki_files(tmp_path_factory):
    return write_pki(tmp_path_factory.mktemp("c-pki"), client_cn="c-client")


def _env(srv, key, named, closed_port, **extra):
    env = dict(os.environ)
    env.update(SAN_ENV)
    env.update({
        "AG_TARGET": srv.address,
        "AG_API_KEY": key,
        "AG_TENANT": TENANT,
        "AG_KEY_NAME": named.name,
        "AG_KEY_HEX": named.key(1).hex(),
        "AG_CLOSED_PORT": str(closed_port),
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(argv, env, *, stdin=None):
    return subprocess.run(argv, env=env, input=stdin, capture_output=True, timeout=RUN_TIMEOUT_S)


def _assert_clean(r, what):
    out, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    assert r.returncode == 0, f"{what} exited with {r.returncode}\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-8000:]}"
    for marker in SAN_MARKERS:
        assert marker not in err, f"{what}: sanitizer report on stderr:\n{err[-8000:]}"
    return out, err


def _section(name, srv, key, named, closed_port, **extra):
    r = _run([CLIENT_TEST, name], _env(srv, key, named, closed_port, **extra))
    out, _ = _assert_clean(r, f"client_test {name}")
    assert f"ok {name}" in out and ", 0 failed" in out, out
    return out


@pytest.mark.parametrize("section", ["compress", "crypto", "async", "threads", "errors"])
def test_c_client_section(built, tenant_server, closed_port, tmp_path, section):
    srv, key, named = tenant_server
    _section(section, srv, key, named, closed_port, AG_OUT_DIR=tmp_path)
    if section == "compress":
        # What the C program got from the service, checked once more by Python.
        original = (tmp_path / "input.bin").read_bytes()
        assert len(original) == MiB
        got = {f: (tmp_path / f"input.bin.{f}").read_bytes() for f in ("deflate", "zlib", "gzip", "zstd", "lz4")}
        assert gzip.decompress(got["gzip"]) == original
        assert zlib.decompress(got["zlib"]) == original
        assert zlib.decompress(got["deflate"], -15) == original
        assert zstandard.ZstdDecompressor().decompress(got["zstd"], max_output_size=2 * MiB) == original
        assert lz4.frame.decompress(got["lz4"]) == original


def test_c_client_tls(built, start_server, pki_files, tenant_server, closed_port):
    srv, key, named = tenant_server
    tls = start_server("--tls-cert", pki_files["server.pem"], "--tls-key", pki_files["server.key"],
                       "--tls-client-ca", pki_files["ca.pem"], "--engines", "1", label="c-mtls")
    _section("tls", srv, key, named, closed_port, AG_TLS_TARGET=tls.address, AG_TLS_ROOTS=pki_files["ca.pem"],
             AG_TLS_OTHER_ROOTS=pki_files["other-ca.pem"], AG_TLS_CERT=pki_files["client.pem"],
             AG_TLS_KEY=pki_files["client.key"])


def test_leak_sanitizer_reports_a_leaked_client(built, tenant_server, closed_port):
    """The leak check is live: a client that is never closed is reported, with the
    library's frames in the report (so no suppression hides the library's leaks)."""
    srv, key, named = tenant_server
    r = _run([CLIENT_TEST, "leak-selftest"], _env(srv, key, named, closed_port))
    err = r.stderr.decode(errors="replace")
    assert r.returncode != 0, "leak-selftest leaked a client, but the process exited 0"
    assert "ERROR: LeakSanitizer: detected memory leaks" in err, err[-4000:]
    assert "accelgate_client_open" in err, f"the report does not point at accelgate_client_open:\n{err[-4000:]}"


# ----------------------------------------------------------------------------------------
# The example program (ASan build too)

_BIG = text_bytes(9 * MiB + 12345, seed=11)  # three chunks of the 4 MiB request limit


def _example(srv, key, *args, stdin=None):
    env = dict(os.environ)
    env.update(SAN_ENV)
    env["ACCELGATE_API_KEY"] = key
    return _run([EXAMPLE, "-t", srv.address, *args], env, stdin=stdin)


@pytest.mark.parametrize("fmt", ["gzip", "zstd", "lz4"])
def test_example_compresses_a_file_in_chunks(built, tenant_server, tmp_path, fmt):
    srv, key, _ = tenant_server
    src, dst = tmp_path / "big.log", tmp_path / f"big.log.{fmt}"
    src.write_bytes(_BIG)
    r = _example(srv, key, "-f", fmt, "-l", "1", "-j", "3", "-v", "-i", str(src), "-o", str(dst))
    _, err = _assert_clean(r, f"accelgate-compress -f {fmt}")
    assert "in 3 chunk(s)" in err and f"tenant {TENANT}" in err, err
    data = dst.read_bytes()
    if fmt == "gzip":
        assert gzip.decompress(data) == _BIG
    elif fmt == "zstd":
        # One frame per chunk.
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
        assert reader.read() == _BIG
    else:
        out, rest = b"", data
        while rest:  # lz4.frame.decompress stops after the first frame
            d = lz4.frame.LZ4FrameDecompressor()
            out += d.decompress(rest)
            assert d.eof, "truncated lz4 frame"
            rest = d.unused_data
        assert out == _BIG


def test_example_refuses_deflate_over_one_request(built, tenant_server, tmp_path):
    srv, key, _ = tenant_server
    src = tmp_path / "big.log"
    src.write_bytes(_BIG)
    r = _example(srv, key, "-f", "zlib", "-i", str(src), "-o", str(tmp_path / "out.zz"))
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 1, err
    assert "cannot be concatenated" in err and "use gzip, zstd or lz4" in err, err
    assert not any(m in err for m in SAN_MARKERS), err


def test_example_small_file_and_decompress(built, tenant_server):
    srv, key, _ = tenant_server
    data = text_bytes(300 * KiB, seed=5)
    r = _example(srv, key, "-f", "deflate", stdin=data)
    out, _ = _assert_clean(r, "accelgate-compress -f deflate")
    assert zlib.decompress(r.stdout, -15) == data
    back = _example(srv, key, "-f", "deflate", "-d", stdin=r.stdout)
    _assert_clean(back, "accelgate-compress -d")
    assert back.stdout == data


def test_example_reports_a_wrong_key_and_an_unreachable_server(built, tenant_server, closed_port):
    srv, _, _ = tenant_server
    r = _example(srv, "not-a-key", stdin=b"hello")
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 1 and "UNAUTHENTICATED" in err, err
    env = dict(os.environ)
    env.update(SAN_ENV)
    r = _run([EXAMPLE, "-t", f"127.0.0.1:{closed_port}"], env, stdin=b"hello")
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 1 and "cannot open the client" in err and "UNAVAILABLE" in err, err
    assert not any(m in err for m in SAN_MARKERS), err
