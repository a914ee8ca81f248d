"""Server reflection under both of its names: grpc.reflection.v1 (what current tools ask
first: grpcurl, Postman, grpc_cli) and grpc.reflection.v1alpha (what older ones ask).

grpcio-reflection (1.85) serves v1alpha only. v1's protocol is v1alpha's under another package:
the same messages, field for field (grpc-proto's grpc/reflection/v1/reflection.proto), so
v1 is served by grpcio-reflection's own servicer with v1alpha's (de)serializers, at v1's method
path. v1's file descriptor, made from v1alpha's by renaming its package, is added to the
descriptor pool so that a client can describe the v1 service as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)

_V1_FILE = "grpc/reflection/v1/reflection.proto"
_V1ALPHA_PACKAGE = ".grpc.reflection.v1alpha."
_V1_PACKAGE = ".grpc.reflection.v1."


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """v1alpha's file descriptor with v1's file name and package."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = _V1_FILE
    proto.package = "grpc.reflection.v1"
    proto.ClearField("options")
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(_V1ALPHA_PACKAGE, _V1_PACKAGE)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(_V1ALPHA_PACKAGE, _V1_PACKAGE)
            method.output_type = method.output_type.replace(_V1ALPHA_PACKAGE, _V1_PACKAGE)
    return proto


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(_V1_FILE)
    except KeyError:
        pool.AddSerializedFile(_v1_file().SerializeToString())


def enable(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Serves reflection v1 and v1alpha on ``server``, listing ``service_names`` and both
    reflection services."""
    _add_v1_descriptor(descriptor_pool.Default())
    names = [*service_names, *SERVICE_NAMES]
    reflection.enable_server_reflection(names, server)
    servicer = reflection.aio.ReflectionServicer(names)  # type: ignore[attr-defined]
    handler = grpc.method_handlers_generic_handler(
        V1_SERVICE_NAME,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
