"""Server reflection as standard tools see it.

grpcio-reflection's own client (the descriptor database grpcurl-like tools in
Python use) lists the services and resolves request and response types into
real message classes, with which a call then succeeds. The raw v1 stream is
also checked directly, as grpcurl speaks v1.
"""
import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from agtest import GZIP, pb

SERVICES = {"accelgate.v1.Accelerator", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"}


def test_grpcio_reflection_lists_services_and_resolves_types(server):
    channel = server.channel()
    db = ProtoReflectionDescriptorDatabase(channel)
    assert SERVICES <= set(db.get_services())
    pool = descriptor_pool.DescriptorPool(db)
    svc = pool.FindServiceByName("accelgate.v1.Accelerator")
    methods = {m.name: m for m in svc.methods}
    assert {"Compress", "Decompress", "DescribeDevice", "Encrypt", "Decrypt", "Digest", "Submit"} <= set(methods)
    compress = methods["Compress"]
    assert compress.input_type.full_name == "accelgate.v1.CompressRequest"
    assert compress.output_type.full_name == "accelgate.v1.CompressResponse"
    assert "data" in compress.input_type.fields_by_name
    # A message class built only from reflected descriptors talks to the server.
    Request = GetMessageClass(compress.input_type)
    Response = GetMessageClass(compress.output_type)
    call = channel.unary_unary("/accelgate.v1.Accelerator/Compress",
                               request_serializer=Request.SerializeToString,
                               response_deserializer=Response.FromString)
    req = Request(data=b"reflected " * 100, level=1)
    req.format = compress.input_type.fields_by_name["format"].enum_type.values_by_name["COMPRESSION_FORMAT_GZIP"].number
    resp = call(req, timeout=30)
    import gzip
    assert gzip.decompress(resp.data) == b"reflected " * 100
    # Health resolves too (a dependency-free file).
    assert pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest").fields_by_name["service"]


def _v1_call(channel, requests):
    """Raw grpc.reflection.v1 exchange with hand-built messages (as grpcurl does)."""
    pool = descriptor_pool.DescriptorPool()
    # Build the v1 request/response classes from the v1alpha ones grpcio-reflection ships:
    # the messages are the same; only the package differs.
    from grpc_reflection.v1alpha import reflection_pb2 as alpha
    fdp = descriptor_pb2.FileDescriptorProto()
    alpha.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = "v1-reflection-for-test.proto"
    fdp.package = "grpc.reflection.v1"
    fdp.service[0].method[0].input_type = ".grpc.reflection.v1.ServerReflectionRequest"
    fdp.service[0].method[0].output_type = ".grpc.reflection.v1.ServerReflectionResponse"
    for m in fdp.message_type:
        for f in m.field:
            if f.type_name.startswith(".grpc.reflection.v1alpha."):
                f.type_name = f.type_name.replace(".v1alpha.", ".v1.")
    pool.Add(fdp)
    Req = GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest"))
    Resp = GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse"))
    stream = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                   request_serializer=Req.SerializeToString, response_deserializer=Resp.FromString)
    return list(stream(iter([Req(**r) for r in requests]), timeout=30))


def test_v1_reflection_answers_list_symbol_file_and_errors(server):
    out = _v1_call(server.channel(), [
        {"list_services": ""},
        {"file_containing_symbol": "accelgate.v1.Accelerator.Compress"},
        {"file_by_filename": "grpc/health/v1/health.proto"},
        {"file_containing_symbol": "no.such.Symbol"},
    ])
    assert len(out) == 4
    assert SERVICES <= {s.name for s in out[0].list_services_response.service}
    files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in out[1].file_descriptor_response.file_descriptor_proto]
    assert files[0].name == "accelgate/v1/accelerator.proto"
    assert any(s.name == "Accelerator" for s in files[0].service)
    health = descriptor_pb2.FileDescriptorProto.FromString(out[2].file_descriptor_response.file_descriptor_proto[0])
    assert health.package == "grpc.health.v1"
    assert out[3].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "no.such.Symbol" in out[3].error_response.error_message


def test_reflection_needs_no_api_key_but_the_api_does(start_server, tmp_path):
    import hashlib
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("tenants:\n  - { id: t1, api_key_sha256: [%s] }\n" % hashlib.sha256(b"k1").hexdigest())
    srv = start_server("--tenants", str(tenants), label="reflection-auth")
    db = ProtoReflectionDescriptorDatabase(srv.channel())
    assert "accelgate.v1.Accelerator" in set(db.get_services())
    with pytest.raises(grpc.RpcError) as e:
        srv.new_stub().Compress(pb.CompressRequest(format=GZIP, data=b"x"), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
