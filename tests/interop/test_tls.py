"""TLS and mTLS on the gRPC port, with certificates generated for the test by
Python's cryptography package and a grpcio client (BoringSSL) as the peer."""
import datetime
import ipaddress

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from accelgate.v1 import accelerator_pb2_grpc as g
from agtest import GZIP, pb


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn):
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key, ca_cert, cn, server):
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                        critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def _pem(obj):
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = _ca("AccelGate test CA")
    other_key, other_ca = _ca("Some other CA")
    srv_key, srv = _leaf(ca_key, ca, "localhost", server=True)
    cli_key, cli = _leaf(ca_key, ca, "tenant-a", server=False)
    rogue_key, rogue = _leaf(other_key, other_ca, "rogue", server=False)
    files = {}
    for name, obj in [("ca.pem", ca), ("server.pem", srv), ("server.key", srv_key), ("client.pem", cli),
                      ("client.key", cli_key), ("rogue.pem", rogue), ("rogue.key", rogue_key)]:
        (d / name).write_bytes(_pem(obj))
        files[name] = str(d / name)
        files[name + ":bytes"] = _pem(obj)
    return files


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
