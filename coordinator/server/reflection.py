"""Server reflection in both of its versions: ``grpc.reflection.v1`` (what grpcurl, Postman and
current grpc-js clients ask first) and ``grpc.reflection.v1alpha`` (older clients).

grpcio-reflection serves v1alpha only. v1 is the same protocol under a new package name —
``reflection.proto`` was copied field for field — so its messages are byte-for-byte those of
v1alpha: the v1 method is served by the v1alpha servicer through v1alpha's (de)serializers, and
v1's file descriptor (v1alpha's, renamed) joins the default pool, so that a client asking for
the symbols of ``grpc.reflection.v1`` gets them as for any other service.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

__all__ = ["V1_SERVICE_NAME", "V1ALPHA_SERVICE_NAME", "enable_reflection"]

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptor() -> None:
    """Put v1's ``reflection.proto`` into the default pool (once): v1alpha's, renamed."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old = f".{file.package}."
    file.name, file.package = _V1_FILE, "grpc.reflection.v1"
    for message in file.message_type:
        for f in message.field:
            if f.type_name.startswith(old):
                f.type_name = ".grpc.reflection.v1." + f.type_name[len(old):]
    for service in file.service:
        for method in service.method:
            method.input_type = ".grpc.reflection.v1." + method.input_type[len(old):]
            method.output_type = ".grpc.reflection.v1." + method.output_type[len(old):]
    pool.Add(file)


def enable_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serve reflection, v1 and v1alpha, listing `service_names` and both reflection services.

    Args:
        service_names: the full names of the services the server offers.
        server: the server (before it starts).
    """
    _add_v1_descriptor()
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    servicer = reflection.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)})
    server.add_generic_rpc_handlers((v1,))
