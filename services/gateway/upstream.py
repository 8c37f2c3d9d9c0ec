"""Calls from the gateway to the data plane (Envoy's mesh listener) and the registry, errors mapped to servegrid's."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from servegrid.registry.v1 import registry_pb2, registry_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.mesh.names import model_headers
from services.runtime import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServegridError,
    Unauthenticated,
    Unavailable,
)
from services.runtime.channels import open_channel
from services.runtime.errors import status_details
from services.runtime.tls import CertFiles

# Large tensors (a ResNet batch) pass; gRPC's 4 MiB default would refuse them.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]

_MAPPED: dict[grpc.StatusCode, tuple[type[ServegridError], str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (InvalidArgument, "INVALID_TENSOR"),
    grpc.StatusCode.NOT_FOUND: (NotFound, "MODEL_NOT_FOUND"),
    grpc.StatusCode.UNAVAILABLE: (Unavailable, "NO_HEALTHY_BACKEND"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (DeadlineExceeded, "DEADLINE_EXCEEDED"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (ResourceExhausted, "RESOURCE_EXHAUSTED"),
    grpc.StatusCode.FAILED_PRECONDITION: (FailedPrecondition, "FAILED_PRECONDITION"),
    grpc.StatusCode.PERMISSION_DENIED: (PermissionDenied, "PERMISSION_DENIED"),
    grpc.StatusCode.UNAUTHENTICATED: (Unauthenticated, "UNAUTHENTICATED"),
}


def map_rpc_error(error: grpc.aio.AioRpcError, what: str) -> Exception:
    """A data-plane/registry failure as the domain error the caller should see.

    The upstream's own message is kept (Triton's "unexpected shape for input 'x'..." is exactly what
    a caller needs), and its ErrorInfo reason when it sent one; anything unexpected stays
    unexpected (INTERNAL with the details only in the log).
    """
    mapped = _MAPPED.get(error.code())
    if mapped is None:
        return RuntimeError(f"{what} failed: {error.code().name}: {error.details()}")
    cls, reason = mapped
    _, info = status_details(error.trailing_metadata())
    if info is not None and info.reason:
        reason = info.reason
    message = error.details() or f"{what} failed"
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        message = f"{what} unavailable: {message}"
    return cls(message, reason=reason, metadata=dict(info.metadata) if info else None)


class KServeClient:
    """KServe v2 client of the data plane: Envoy's mesh listener, which routes by the model header.

    Every call names its model in `x-servegrid-model` (and `x-servegrid-model-version`), so Envoy
    routes on the header; Envoy still checks that the body names the same model.
    """

    def __init__(self, address: str, tls: CertFiles | None = None) -> None:
        self.address = address
        self.channel = open_channel(address, tls=tls, peer="envoy", options=CHANNEL_OPTIONS)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    async def infer(
        self,
        request: service_pb2.ModelInferRequest,
        timeout_s: float,
        metadata: Sequence[tuple[str, str]],
    ) -> service_pb2.ModelInferResponse:
        metadata = [*metadata, *model_headers(request.model_name, request.model_version)]
        try:
            response: service_pb2.ModelInferResponse = await self.stub.ModelInfer(
                request, timeout=timeout_s, metadata=metadata
            )
        except grpc.aio.AioRpcError as error:
            raise map_rpc_error(error, "inference") from None
        return response

    async def metadata(self, name: str, version: str, timeout_s: float) -> service_pb2.ModelMetadataResponse:
        try:
            response: service_pb2.ModelMetadataResponse = await self.stub.ModelMetadata(
                service_pb2.ModelMetadataRequest(name=name, version=version),
                timeout=timeout_s,
                metadata=model_headers(name, version),
            )
        except grpc.aio.AioRpcError as error:
            raise map_rpc_error(error, "model metadata") from None
        return response

    async def close(self) -> None:
        await self.channel.close()


class RegistryClient:
    """Read-only client of the registry: which models exist and how they route."""

    def __init__(self, address: str, timeout_s: float, tls: CertFiles | None = None) -> None:
        self.timeout_s = timeout_s
        self.channel = open_channel(address, tls=tls, peer="registry", options=CHANNEL_OPTIONS)
        self.stub = registry_pb2_grpc.RegistryServiceStub(self.channel)

    async def list_models(self, page_size: int, page_token: str) -> registry_pb2.ListModelsResponse:
        try:
            response: registry_pb2.ListModelsResponse = await self.stub.ListModels(
                registry_pb2.ListModelsRequest(page_size=page_size, page_token=page_token), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as error:
            raise map_rpc_error(error, "the registry") from None
        return response

    async def get_model(self, model_id: str) -> registry_pb2.Model:
        try:
            response: registry_pb2.GetModelResponse = await self.stub.GetModel(
                registry_pb2.GetModelRequest(model_id=model_id), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as error:
            raise map_rpc_error(error, "the registry") from None
        return response.model

    async def resolve_route(self, model_id: str) -> registry_pb2.Route | None:
        """The model's route, or None when nothing of it is servable."""
        try:
            response: registry_pb2.ResolveRouteResponse = await self.stub.ResolveRoute(
                registry_pb2.ResolveRouteRequest(model_id=model_id), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                return None
            raise map_rpc_error(error, "the registry") from None
        return response.route

    async def close(self) -> None:
        await self.channel.close()
