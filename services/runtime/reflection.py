"""Server reflection, v1 (`grpc.reflection.v1`) and v1alpha, over one descriptor pool: what grpcurl and
other tools discover."""

# grpcio-reflection ships v1alpha only. v1 is the same protocol under another package: its messages are
# byte-for-byte v1alpha's, so one servicer answers both, and v1's descriptor is v1alpha's file renamed
# (package grpc.reflection.v1, file grpc/reflection/v1/reflection.proto), added to the pool so that
# `describe grpc.reflection.v1.ServerReflection` works too.

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
REFLECTION_SERVICES = (V1_SERVICE, V1ALPHA_SERVICE)


def v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto: v1alpha's file under v1's package and name."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    alpha = proto.package
    proto.name = V1_FILE
    proto.package = V1_PACKAGE
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(f".{alpha}."):
                field.type_name = f".{V1_PACKAGE}." + field.type_name.removeprefix(f".{alpha}.")
    for service in proto.service:
        for method in service.method:
            method.input_type = f".{V1_PACKAGE}." + method.input_type.removeprefix(f".{alpha}.")
            method.output_type = f".{V1_PACKAGE}." + method.output_type.removeprefix(f".{alpha}.")
    proto.options.Clear()  # v1alpha's language options (java package, ...) do not describe v1
    return proto


def add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Put v1's file into `pool` once (grpc.reflection.v1 messages and service become describable)."""
    try:
        pool.FindFileByName(V1_FILE)
    except KeyError:
        pool.AddSerializedFile(v1_file().SerializeToString())


class _ReflectionServicer(reflection.aio.ReflectionServicer):
    """grpcio-reflection's servicer, plus methods as symbols: `grpcurl describe pkg.Service.Method` asks for
    the file containing the method, which the pool only finds by the service's name."""

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        reply = super()._file_containing_symbol(request, fully_qualified_name)
        service, _, method = fully_qualified_name.rpartition(".")
        if reply.HasField("error_response") and service:
            try:
                found = self._pool.FindServiceByName(service)
            except KeyError:
                return reply
            if method in found.methods_by_name:
                return super()._file_containing_symbol(request, service)
        return reply


def enable_reflection(
    server: grpc.aio.Server, service_names: Iterable[str], pool: descriptor_pool.DescriptorPool | None = None
) -> None:
    """Answer reflection v1 and v1alpha on `server`, listing `service_names` (and reflection itself) and
    describing whatever `pool` (the default one: every generated module imported) holds."""
    pool = pool or descriptor_pool.Default()
    add_v1_descriptor(pool)
    servicer = _ReflectionServicer(sorted({*service_names, *REFLECTION_SERVICES}), pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": v1}),))
