"""CompressStream and DecompressStream: streams of any length through device
stream contexts, read and written by Python's own gzip, zlib and zstandard."""
import gzip
import os
import resource  # noqa: F401
import time
import zlib

import grpc
import pytest
import zstandard

from agtest import pb

MiB = 1 << 20
KiB = 1 << 10
FORMATS = {"gzip": pb.COMPRESSION_FORMAT_GZIP, "zlib": pb.COMPRESSION_FORMAT_ZLIB,
           "deflate": pb.COMPRESSION_FORMAT_DEFLATE, "zstd": pb.COMPRESSION_FORMAT_ZSTD}


def mixed(n):
    """Compressible text with incompressible stretches, n bytes."""
    out, i = bytearray(), 0
    rnd = os.urandom(256 * 1024)
    while len(out) < n:
        out += b"".join(b"%d GET /objects/%d?part=%d 200\n" % (i + k, (i + k) * 7919 % 100003, k % 17) for k in range(2000))
        if i % 5 == 0:
            out += rnd[: (i * 4099) % len(rnd)]
        i += 1
    return bytes(out[:n])


def py_unpack(name, blob):
    if name == "gzip":
        return gzip.decompress(blob)
    if name == "zlib":
        return zlib.decompress(blob)
    if name == "deflate":
        return zlib.decompress(blob, -15)
    return zstandard.ZstdDecompressor().decompressobj().decompress(blob)


def py_pack(name, data):
    if name == "gzip":
        return gzip.compress(data, 6)
    if name == "zlib":
        return zlib.compress(data, 6)
    if name == "deflate":
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush()
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)


def chunks(data, size, first):
    for off in range(0, len(data), size):
        piece = data[off:off + size]
        yield dict(first, data=piece, final=off + size >= len(data)) if off == 0 else dict(data=piece, final=off + size >= len(data))
    if not data:
        yield dict(first, data=b"", final=True)


def compress_stream(stub, name, data, chunk=MiB, level=None, metadata=None):
    first = {"format": FORMATS[name]}
    if level is not None:
        first["level"] = level
    reqs = (pb.CompressStreamRequest(**m) for m in chunks(data, chunk, first))
    out, last = bytearray(), None
    for r in stub.CompressStream(reqs, timeout=300, metadata=metadata):
        out += r.data
        last = r
    assert last.final and last.total_in == len(data) and last.total_out == len(out)
    return bytes(out), last


def decompress_stream(stub, name, blob, chunk=MiB, cap=0):
    reqs = (pb.DecompressStreamRequest(**m) for m in chunks(blob, chunk, {"format": FORMATS[name], "max_output_bytes": cap}))
    out, last = bytearray(), None
    for r in stub.DecompressStream(reqs, timeout=300):
        out += r.data
        last = r
    assert last.final and last.total_out == len(out)
    return bytes(out), last


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_64_mib_stream_round_trips_through_python(stub, name):
    data = mixed(64 * MiB)
    packed, last = compress_stream(stub, name, data)
    assert last.jobs >= 64  # one job (or more) per chunk: the scheduler sees every chunk
    assert py_unpack(name, packed) == data  # one standard stream, not members
    back, _ = decompress_stream(stub, name, py_pack(name, data))
    assert back == data


@pytest.mark.parametrize("name", list(FORMATS))
def test_odd_chunk_sizes_empty_streams_and_levels(stub, name):
    data = mixed(3 * MiB + 12345)
    packed, _ = compress_stream(stub, name, data, chunk=333_333, level=1)
    assert py_unpack(name, packed) == data
    back, _ = decompress_stream(stub, name, packed, chunk=77_777)
    assert back == data
    empty, _ = compress_stream(stub, name, b"")
    assert py_unpack(name, empty) == b""


def _code(fn):
    try:
        fn()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


@pytest.mark.parametrize("name", ["gzip", "zlib", "zstd"])
def test_bad_streams_get_clear_statuses(stub, name):
    data = mixed(2 * MiB)
    blob = py_pack(name, data)
    # Cut off mid-way: the input ends before the stream does.
    assert _code(lambda: decompress_stream(stub, name, blob[: len(blob) // 2])) == grpc.StatusCode.INVALID_ARGUMENT
    # A corrupt chunk in the middle.
    bad = bytearray(blob)
    for i in range(len(bad) // 2, len(bad) // 2 + 64):
        bad[i] ^= 0x55
    assert _code(lambda: decompress_stream(stub, name, bytes(bad))) in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS)
    # A damaged trailer checksum.
    tail = bytearray(blob)
    tail[-6 if name == "gzip" else -1] ^= 0xFF
    assert _code(lambda: decompress_stream(stub, name, bytes(tail))) == grpc.StatusCode.DATA_LOSS
    if name == "gzip":
        # A wrong ISIZE (the length modulo 2^32, after the CRC), the CRC intact.
        size = bytearray(blob)
        size[-2] ^= 0x01
        assert _code(lambda: decompress_stream(stub, name, bytes(size))) == grpc.StatusCode.DATA_LOSS
    # An output bomb against the caller's cap.
    bomb = py_pack(name, bytes(40 * MiB))
    assert _code(lambda: decompress_stream(stub, name, bomb, cap=8 * MiB)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Still serving.
    assert decompress_stream(stub, name, blob)[0] == data


def _send_pieces(stub, pieces):
    """DecompressStream of gzip data sent exactly as the given pieces (the last one final)."""
    reqs = [pb.DecompressStreamRequest(format=FORMATS["gzip"], data=pieces[0], final=len(pieces) == 1)]
    reqs += [pb.DecompressStreamRequest(data=p, final=i == len(pieces) - 1) for i, p in enumerate(pieces[1:], 1)]
    out = bytearray()
    for r in stub.DecompressStream(iter(reqs), timeout=120):
        out += r.data
    return bytes(out)


def test_a_gzip_member_per_message_decompresses_every_member(stub):
    """BGZF-like input: each message carries exactly one gzip member, so every member
    ends at the end of a chunk. All of them must come out, as Python's gzip reads them."""
    parts = [mixed(100_000 + 7 * k) for k in range(5)]
    members = [gzip.compress(p, 6) for p in parts]
    assert gzip.decompress(b"".join(members)) == b"".join(parts)
    assert _send_pieces(stub, members) == b"".join(parts)
    # A member's header split across messages, and empty messages between members.
    joined = b"".join(members)
    cut = len(members[0]) + 1  # one byte of the second member's header in the first message
    assert _send_pieces(stub, [joined[:cut], joined[cut:]]) == b"".join(parts)
    assert _send_pieces(stub, [members[0], b"", members[1], b""]) == parts[0] + parts[1]
    # Bytes after a member that do not open another are refused, at a chunk edge or inside one.
    for pieces in ([members[0], b"junk"], [members[0] + b"junk"], [members[0], b"\x1f\x00rest"]):
        assert _code(lambda: _send_pieces(stub, pieces)) == grpc.StatusCode.INVALID_ARGUMENT


def test_lz4_is_refused_for_streams(stub):
    assert _code(lambda: compress_stream(stub, "gzip", b"x") and list(stub.CompressStream(
        iter([pb.CompressStreamRequest(format=pb.COMPRESSION_FORMAT_LZ4, data=b"x", final=True)]), timeout=10))) \
        == grpc.StatusCode.INVALID_ARGUMENT


def _device_seconds(port):
    import re
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'accelgate_device_seconds_total\{tenant="([^"]+)"\} ([0-9.e+-]+)', text)}


def test_a_stream_gets_its_weighted_share_and_a_4k_tenant_stays_responsive(start_server, tmp_path):
    """One engine capped at 50 MB/s, so the device is the bottleneck on any machine.
    A streamer of weight 3 competes with a bulk tenant of weight 1 (1 MiB unary
    jobs, 6 at a time) while a light tenant sends 4 KiB jobs one by one.

    The streamer should get 3/4 of the device. It only can if its next slice is
    already waiting when one completes (read-ahead); a stream that submits one
    slice at a time leaves every gap to the bulk tenant and gets about half."""
    import threading
    import time

    from agtest import Tenant, new_key, write_tenants
    streamer, bulk, light = (Tenant(n, [new_key(n)], weight=w) for n, w in (("streamer", 3), ("bulk", 1), ("light", 1)))
    path = write_tenants(str(tmp_path / "tenants.yaml"), [streamer, bulk, light])
    srv = start_server("--tenants", path, "--engines", 1, "--engine-cap-mbps", 50, label="stream-share")
    stub = srv.stub()
    block = mixed(MiB)
    stop = threading.Event()
    errors = []

    def stream_forever():
        def reqs():
            yield pb.CompressStreamRequest(format=pb.COMPRESSION_FORMAT_GZIP, level=1, data=block)
            while not stop.is_set():
                yield pb.CompressStreamRequest(data=block)
            yield pb.CompressStreamRequest(final=True)
        try:
            for _ in stub.CompressStream(reqs(), timeout=120, metadata=streamer.md):
                pass
        except grpc.RpcError as e:  # pragma: no cover - reported below
            errors.append(f"stream: {e.code()} {e.details()}")

    def bulk_forever():
        while not stop.is_set():
            try:
                stub.Compress(pb.CompressRequest(format=pb.COMPRESSION_FORMAT_GZIP, level=1, data=block),
                              timeout=60, metadata=bulk.md)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    errors.append(f"bulk: {e.code()} {e.details()}")
                time.sleep(0.01)

    threads = [threading.Thread(target=stream_forever)] + [threading.Thread(target=bulk_forever) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)  # both loads reach steady state
        before = _device_seconds(srv.metrics_port)
        latencies, small = [], b"light tenant line\n" * 228  # about 4 KiB
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            r = stub.Compress(pb.CompressRequest(format=pb.COMPRESSION_FORMAT_ZLIB, data=small), timeout=30,
                              metadata=light.md)
            latencies.append(time.monotonic() - t0)
            assert zlib.decompress(r.data) == small
        after = _device_seconds(srv.metrics_port)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not errors, errors
    used = {t: after.get(t, 0) - before.get(t, 0) for t in ("streamer", "bulk")}
    share = used["streamer"] / sum(used.values())
    # Weight 3 of 4: 75 %, within ±25 % of it. Without read-ahead it is about 50 %.
    assert 0.5625 <= share <= 0.9375, f"streamer share {share:.3f} (device seconds {used})"
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1] if len(latencies) >= 100 else latencies[-1]
    # Generous: an engine is held for one 1 MiB slice (about 20 ms at 50 MB/s).
    assert len(latencies) >= 10 and p99 < 2.0, f"{len(latencies)} light calls, p99 {p99:.3f} s"


def _stream_contexts_open(port):
    import re
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(v) for v in re.findall(r'accelgate_queue_stream_contexts_open\{[^}]*\} ([0-9.e+-]+)', text))


def test_a_client_that_stops_reading_gets_resource_exhausted_and_its_context_back(start_server):
    """A DecompressStream whose output (512 MiB of zeros from a 0.5 MiB input) the client
    never reads: HTTP/2 flow control holds the server's writes, and after the stream
    write timeout (1 s here) the call ends with RESOURCE_EXHAUSTED and the device
    context goes back. Without the timeout the stream holds its context until the
    call's deadline (60 s here) and the wait below fails."""
    import time
    srv = start_server("--stream-write-timeout-ms", 1000, label="stream-stall")
    stub = srv.stub()
    bomb = gzip.compress(bytes(512 * MiB), 1)
    reqs = iter([pb.DecompressStreamRequest(format=pb.COMPRESSION_FORMAT_GZIP, data=bomb, final=True)])
    call = stub.DecompressStream(reqs, timeout=60)
    first = next(call)  # the stream is open and producing; now stop reading
    assert first.data
    t0 = time.monotonic()
    while _stream_contexts_open(srv.metrics_port) > 0 and time.monotonic() - t0 < 30:
        time.sleep(0.2)
    assert _stream_contexts_open(srv.metrics_port) == 0, "the stalled stream still holds its device context"
    assert time.monotonic() - t0 < 30
    # The client reads again: the buffered output, then the status.
    with pytest.raises(grpc.RpcError) as e:
        for _ in call:
            pass
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
    assert "stream write timeout" in e.value.details()
    # Still serving streams.
    data = mixed(3 * MiB)
    assert gzip.decompress(compress_stream(stub, "gzip", data)[0]) == data


def test_each_chunks_output_comes_back_before_the_next_chunk_is_sent(stub):
    """A client may send a chunk and wait for its output (ping-pong): the server
    writes a slice's output as soon as the device has it, not when the next chunk
    arrives."""
    import queue
    import threading
    data = mixed(4 * MiB)
    blob = gzip.compress(data, 6)
    piece = 64 * KiB
    got = queue.Queue()
    waited = []

    def requests():
        yield pb.DecompressStreamRequest(format=pb.COMPRESSION_FORMAT_GZIP, data=blob[:piece])
        for off in range(piece, len(blob), piece):
            if len(waited) < 8:
                waited.append(got.get(timeout=20))  # the previous chunk's output, before sending more
            yield pb.DecompressStreamRequest(data=blob[off:off + piece], final=off + piece >= len(blob))

    out = bytearray()
    for r in stub.DecompressStream(requests(), timeout=60):
        out += r.data
        if r.data:
            got.put(len(r.data))
    assert bytes(out) == data
    assert len(waited) == 8


def test_many_cancelled_streams_give_every_context_back(start_server):
    """Streams cancelled by their clients mid-way (slices still on the device) give
    their contexts back once the device is done, and new streams still open."""
    import threading
    import time
    srv = start_server("--engines", 1, "--engine-cap-mbps", 100, label="stream-cancel")
    stub = srv.stub()
    block = mixed(MiB)

    def one(i):
        def reqs():
            yield pb.CompressStreamRequest(format=pb.COMPRESSION_FORMAT_GZIP, level=1, data=block)
            while True:
                yield pb.CompressStreamRequest(data=block)
        call = stub.CompressStream(reqs(), timeout=60)
        try:
            next(call)
        except grpc.RpcError as e:
            # 24 at once is more than the tenant's 16 open streams: the rest are refused until contexts come back.
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tenant_streams" in e.details(), e
            return
        time.sleep(0.05 * (i % 4))
        call.cancel()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    t0 = time.monotonic()
    while _stream_contexts_open(srv.metrics_port) > 0 and time.monotonic() - t0 < 20:
        time.sleep(0.2)
    assert _stream_contexts_open(srv.metrics_port) == 0
    data = mixed(3 * MiB)
    assert gzip.decompress(compress_stream(stub, "gzip", data)[0]) == data


def _open_idle_compress_stream(stub, md=None):
    """A CompressStream that sends its first chunk and then nothing: it holds a device context."""
    import queue
    gate = queue.Queue()

    def requests():
        yield pb.CompressStreamRequest(format=pb.COMPRESSION_FORMAT_GZIP, data=b"idle", final=False)
        gate.get()  # until the test lets it go (or never)

    call = stub.CompressStream(requests(), timeout=60, metadata=md)
    return call, gate


def test_a_tenant_cannot_hoard_stream_contexts(start_server, tmp_path):
    """Issue 17, finding 5: one client opening many idle streams took every stream
    context and locked every other tenant out. Now a tenant holds at most its
    max_open_streams (3 here); the next one is RESOURCE_EXHAUSTED (tenant_streams),
    and another tenant still opens streams."""
    from agtest import Tenant, new_key, write_tenants
    hoarder = Tenant("hoarder", [new_key("hoarder")], limits={"max_open_streams": 3})
    other = Tenant("other", [new_key("other")])
    path = write_tenants(str(tmp_path / "tenants.yaml"), [hoarder, other])
    srv = start_server("--tenants", path, label="stream-quota")
    stub = srv.stub()
    held = []
    try:
        for _ in range(3):
            call, gate = _open_idle_compress_stream(stub, hoarder.md)
            held.append((call, gate))
        # Each of the three has its context once the server answers the stream's open.
        t0 = time.monotonic()
        while _stream_contexts_open(srv.metrics_port) < 3 and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        assert _stream_contexts_open(srv.metrics_port) == 3
        fourth, gate4 = _open_idle_compress_stream(stub, hoarder.md)
        gate4.put(None)
        with pytest.raises(grpc.RpcError) as e:
            for _ in fourth:
                pass
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
        assert "tenant_streams" in e.value.details()
        # Another tenant is not affected.
        data = mixed(1 * MiB)
        out, _ = compress_stream(stub, "gzip", data, metadata=other.md)
        assert gzip.decompress(out) == data
    finally:
        for call, gate in held:
            gate.put(None)
            call.cancel()


def test_an_idle_stream_ends_and_gives_its_context_back(start_server):
    """Issue 17, finding 5: a stream whose client sends nothing for the idle timeout
    (1 s here) ends with RESOURCE_EXHAUSTED and its device context goes back."""
    srv = start_server("--stream-idle-timeout-ms", 1000, label="stream-idle")
    stub = srv.stub()
    call, gate = _open_idle_compress_stream(stub)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        for _ in call:
            pass
    waited = time.monotonic() - t0
    gate.put(None)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
    assert "stream idle timeout" in e.value.details()
    assert waited < 30
    t0 = time.monotonic()
    while _stream_contexts_open(srv.metrics_port) > 0 and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    assert _stream_contexts_open(srv.metrics_port) == 0
    data = mixed(1 * MiB)
    assert gzip.decompress(compress_stream(stub, "gzip", data)[0]) == data
