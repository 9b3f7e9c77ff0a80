"""Certificates for the TLS tests, generated with Python's cryptography package:
a CA, a server certificate for localhost/127.0.0.1, a client certificate from
the same CA, and a rogue client certificate from another CA."""
import datetime
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


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


def write_pki(d, client_cn="tenant-a"):
    """Writes ca.pem, other-ca.pem, server.pem/.key, client.pem/.key and rogue.pem/.key
    into directory `d`; returns {name: path} plus {name + ":bytes": PEM bytes}."""
    ca_key, ca = _ca("AccelGate test CA")
    other_key, other_ca = _ca("Some other CA")
    srv_key, srv = _leaf(ca_key, ca, "localhost", server=True)
    cli_key, cli = _leaf(ca_key, ca, client_cn, server=False)
    rogue_key, rogue = _leaf(other_key, other_ca, "rogue", server=False)
    files = {}
    for name, obj in [("ca.pem", ca), ("other-ca.pem", other_ca), ("server.pem", srv), ("server.key", srv_key),
                      ("client.pem", cli), ("client.key", cli_key), ("rogue.pem", rogue), ("rogue.key", rogue_key)]:
        (d / name).write_bytes(_pem(obj))
        files[name] = str(d / name)
        files[name + ":bytes"] = _pem(obj)
    return files
