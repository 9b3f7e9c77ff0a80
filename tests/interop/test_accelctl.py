"""accelctl, the command-line client, against a real gateway: every verb
round-trips a file, and its outputs are checked with Python's own gzip,
hashlib, zlib and cryptography (independent implementations)."""
import gzip
import hashlib
import json
import os
import subprocess
import zlib

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from conftest import ROOT


def ctl_binary():
    return os.environ.get("ACCELCTL_BIN") or os.path.join(ROOT, ".build", "debug", "accelctl")


@pytest.fixture(scope="module")
def gateway(start_module_server):
    return start_module_server("--engines", "1", label="accelctl")


def ctl(gateway, *args, stdin=None, check=True):
    p = subprocess.run([ctl_binary(), *args[:1], "-t", f"127.0.0.1:{gateway.port}", *args[1:]], input=stdin,
                       capture_output=True, timeout=120)
    if check:
        assert p.returncode == 0, f"accelctl {' '.join(args)} failed: {p.stderr.decode()}"
    return p


@pytest.fixture
def sample(tmp_path):
    data = b"".join(b"%d accelctl line %d\n" % (i, i * 7) for i in range(60000))  # ~1.3 MB
    path = tmp_path / "in.txt"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("fmt", ["gzip", "zlib", "deflate"])
def test_compress_and_decompress_round_trip_files(gateway, sample, tmp_path, fmt):
    path, data = sample
    out, back = tmp_path / "c.bin", tmp_path / "back.txt"
    ctl(gateway, "compress", "--format", fmt, "-i", str(path), "-o", str(out))
    packed = out.read_bytes()
    wbits = {"gzip": 31, "zlib": 15, "deflate": -15}[fmt]
    assert zlib.decompress(packed, wbits) == data
    ctl(gateway, "decompress", "--format", fmt, "-i", str(out), "-o", str(back))
    assert back.read_bytes() == data


def test_stdin_and_stdout_work_too(gateway, sample):
    _, data = sample
    p = ctl(gateway, "compress", "--format", "gzip", stdin=data)
    assert gzip.decompress(p.stdout) == data
    q = ctl(gateway, "decompress", "--format", "gzip", stdin=p.stdout)
    assert q.stdout == data


@pytest.mark.parametrize("alg,cls,klen", [("aes-256-gcm", AESGCM, 32), ("aes-128-gcm", AESGCM, 16),
                                          ("chacha20-poly1305", ChaCha20Poly1305, 32)])
def test_encrypt_and_decrypt_round_trip_and_python_can_open_it(gateway, sample, tmp_path, alg, cls, klen):
    path, data = sample
    key = os.urandom(klen)
    keyfile = tmp_path / "k.bin"
    keyfile.write_bytes(key)
    sealed, back = tmp_path / "ct.bin", tmp_path / "back.txt"
    ctl(gateway, "encrypt", "--algorithm", alg, "--key-file", str(keyfile), "--aad", "hdr", "-i", str(path),
        "-o", str(sealed))
    blob = sealed.read_bytes()
    assert cls(key).decrypt(blob[:12], blob[12:], b"hdr") == data  # nonce || ciphertext || tag
    ctl(gateway, "decrypt", "--algorithm", alg, "--key-file", str(keyfile), "--aad", "hdr", "-i", str(sealed),
        "-o", str(back))
    assert back.read_bytes() == data
    # A wrong AAD fails authentication and writes nothing.
    bad = ctl(gateway, "decrypt", "--algorithm", alg, "--key-file", str(keyfile), "--aad", "other", "-i", str(sealed),
              "-o", str(tmp_path / "never.txt"), check=False)
    assert bad.returncode != 0 and b"authentication failed" in bad.stderr
    assert not (tmp_path / "never.txt").exists()


def test_encrypt_with_chained_compression_and_hex_key(gateway, sample, tmp_path):
    path, data = sample
    key = os.urandom(32)
    keyfile = tmp_path / "k.hex"
    keyfile.write_text(key.hex() + "\n")
    sealed = tmp_path / "ct.bin"
    ctl(gateway, "encrypt", "--algorithm", "aes-256-gcm", "--key-file", str(keyfile), "--key-hex",
        "--compress", "gzip", "-i", str(path), "-o", str(sealed))
    blob = sealed.read_bytes()
    assert len(blob) < len(data) // 2  # compressed before sealing
    assert gzip.decompress(AESGCM(key).decrypt(blob[:12], blob[12:], b"")) == data
    p = ctl(gateway, "decrypt", "--algorithm", "aes-256-gcm", "--key-file", str(keyfile), "--key-hex",
            "--decompress", "gzip", "-i", str(sealed))
    assert p.stdout == data


def test_digest_matches_python(gateway, sample, tmp_path):
    path, data = sample
    for alg, want in [("sha256", hashlib.sha256(data).hexdigest()), ("sha512", hashlib.sha512(data).hexdigest()),
                      ("crc32", "%08x" % zlib.crc32(data)), ("adler32", "%08x" % zlib.adler32(data))]:
        out = ctl(gateway, "digest", "--algorithm", alg, "-i", str(path)).stdout.decode().split()
        assert out[0] == want, alg
    key = tmp_path / "hk"
    key.write_bytes(b"hmac key")
    import hmac
    out = ctl(gateway, "digest", "--algorithm", "hmac-sha256", "--key-file", str(key), "-i", str(path)).stdout.split()
    assert out[0].decode() == hmac.new(b"hmac key", data, hashlib.sha256).hexdigest()


def test_status_and_describe(gateway):
    text = ctl(gateway, "status").stdout.decode()
    assert "healthy" in text and "queue" in text
    assert "tenant    default (you): weight 1, waiting 0/256 jobs" in text, text
    d = json.loads(ctl(gateway, "status", "--json").stdout)
    assert d["device"]["healthy"] is True and len(d["queues"]) == 2


def test_bench_reports_percentiles_and_writes_json_and_a_plot(gateway, tmp_path):
    out, svg = tmp_path / "bench.json", tmp_path / "bench.svg"
    p = ctl(gateway, "bench", "-c", "4", "--duration", "2", "--mix", "compress:2,decompress:1,encrypt:1,decrypt:1,digest:1",
            "--sizes", "4K,16K", "--json", str(out), "--plot", str(svg))
    assert b"p99" in p.stdout
    r = json.loads(out.read_text())
    ops = {x["operation"]: x for x in r["results"]}
    assert set(ops) == {"compress", "decompress", "encrypt", "decrypt", "digest"}
    for x in ops.values():
        assert x["calls"] > 0 and not x["errors"], x
        lat = x["latencyMicroseconds"]
        assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert svg.read_text().startswith("<svg") and "polyline" in svg.read_text()
    # Open loop at a target rate: about rate × duration calls, whatever the concurrency.
    p = ctl(gateway, "bench", "-c", "4", "--duration", "2", "--rate", "50", "--sizes", "1K", "--json", str(out))
    calls = json.loads(out.read_text())["results"][0]["calls"]
    assert 60 <= calls <= 125, calls  # 100 scheduled; generous bounds for a busy machine


@pytest.mark.parametrize("fmt", ["gzip", "zlib", "deflate", "zstd"])
def test_files_over_the_chunk_size_stream_as_one_standard_stream(gateway, tmp_path, fmt):
    import zstandard
    data = b"".join(b"%d a longer log line for streaming %d\n" % (i, i % 97) for i in range(250_000))  # ~9 MB
    src, packed, back = tmp_path / "in.txt", tmp_path / "c.bin", tmp_path / "back.txt"
    src.write_bytes(data)
    ctl(gateway, "compress", "--format", fmt, "--chunk-bytes", str(1 << 20), "-i", str(src), "-o", str(packed))
    blob = packed.read_bytes()
    if fmt == "zstd":
        assert zstandard.ZstdDecompressor().decompressobj().decompress(blob) == data
        assert zstandard.frame_header_size(blob) and blob.count(b"\x28\xb5\x2f\xfd") == 1  # one frame
    else:
        d = zlib.decompressobj({"gzip": 31, "zlib": 15, "deflate": -15}[fmt])
        assert d.decompress(blob) == data and d.unused_data == b""  # one stream, nothing after it
    ctl(gateway, "decompress", "--format", fmt, "--chunk-bytes", str(1 << 20), "-i", str(packed), "-o", str(back))
    assert back.read_bytes() == data


def test_health_exits_zero_when_serving_and_nonzero_when_unreachable(gateway):
    p = ctl(gateway, "health", "--timeout", "5")
    assert p.stdout.decode().strip() == "SERVING"
    import socket
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    q = subprocess.run([ctl_binary(), "health", "-t", f"127.0.0.1:{dead}", "--timeout", "2"],
                       capture_output=True, timeout=60)
    assert q.returncode == 2, q.stdout + q.stderr
    assert b"UNREACHABLE" in q.stdout
