"""TLS and mTLS on the gRPC port, with certificates generated for the test by
Python's cryptography package and a grpcio client (BoringSSL) as the peer."""
import grpc
import pytest

from accelgate.v1 import accelerator_pb2_grpc as g
from agtest import GZIP, pb
from pkihelp import write_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_pki(tmp_path_factory.mktemp("pki"))


def _stub(port, creds):
    ch = grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")])
    return ch, g.AcceleratorStub(ch)


def _compress(stub):
    return stub.Compress(pb.CompressRequest(format=GZIP, data=b"over tls " * 100), timeout=10)


def test_tls_serves_a_verifying_client_and_refuses_plaintext(start_server, pki):
    srv = start_server("--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"], "--engines", "1", label="tls")
    ch, stub = _stub(srv.port, grpc.ssl_channel_credentials(root_certificates=pki["ca.pem:bytes"]))
    import gzip
    assert gzip.decompress(_compress(stub).data) == b"over tls " * 100
    ch.close()
    plain = grpc.insecure_channel(f"127.0.0.1:{srv.port}")

    with pytest.raises(grpc.RpcError) as e:
        _compress(g.AcceleratorStub(plain))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    plain.close()


def test_mtls_requires_a_client_certificate_from_the_configured_ca(start_server, pki):
    srv = start_server("--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"], "--tls-client-ca", pki["ca.pem"],
                       "--engines", "1", label="mtls")
    good = grpc.ssl_channel_credentials(pki["ca.pem:bytes"], pki["client.key:bytes"], pki["client.pem:bytes"])
    ch, stub = _stub(srv.port, good)
    assert _compress(stub).data
    ch.close()
    for label, creds in [("no client certificate", grpc.ssl_channel_credentials(pki["ca.pem:bytes"])),
                         ("a certificate from another CA",
                          grpc.ssl_channel_credentials(pki["ca.pem:bytes"], pki["rogue.key:bytes"], pki["rogue.pem:bytes"]))]:
        ch, stub = _stub(srv.port, creds)
        with pytest.raises(grpc.RpcError) as e:
            _compress(stub)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, label
        ch.close()


def test_half_a_tls_configuration_is_refused_at_start(tmp_path, pki):
    import subprocess
    from conftest import server_binary
    r = subprocess.run([server_binary(), "serve", "--port", "0", "--no-metrics", "--tls-cert", pki["server.pem"]],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "tls.certificate and tls.private_key go together" in r.stderr, r.stderr
