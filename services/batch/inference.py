"""The worker pool's KServe v2 client of the data plane (Envoy's mesh listener): packed inference, model shapes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.batch.tensors import ModelShape
from services.mesh.names import model_headers
from services.runtime.channels import open_channel
from services.runtime.tls import CertFiles

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    # A restarted backend must be redialled quickly, not after the default 20 s+ backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# The model's own verdict on the input: retrying cannot help.
PERMANENT_CODES = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED}
)


class InferenceFailure(Exception):
    """An inference call failed; `permanent` says whether trying again could help."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @property
    def permanent(self) -> bool:
        return self.code in PERMANENT_CODES


class KServeBatchClient:
    """ModelInfer and ModelConfig against one KServe v2 endpoint, with model shapes cached briefly.

    Calls name their model in the headers Envoy routes on, so canary, shadow, ejection and breakers
    apply to batch items exactly as to real-time calls.
    """

    def __init__(self, address: str, *, timeout_s: float, config_ttl_s: float, tls: CertFiles | None = None) -> None:
        self.address = address
        self.tls = tls
        self._timeout_s = timeout_s
        self._config_ttl_s = config_ttl_s
        # Opened on first use: a grpc.aio channel belongs to the event loop it was made on, and the
        # composition root runs before the service's loop exists.
        self._channel: grpc.aio.Channel | None = None
        self._stub_instance: service_pb2_grpc.GRPCInferenceServiceStub | None = None
        self._shapes: dict[tuple[str, str], tuple[float, ModelShape]] = {}
        self._shape_locks: dict[tuple[str, str], asyncio.Lock] = {}

    @property
    def _stub(self) -> service_pb2_grpc.GRPCInferenceServiceStub:
        if self._stub_instance is None:
            self._channel = open_channel(self.address, tls=self.tls, peer="envoy", options=_CHANNEL_OPTIONS)
            self._stub_instance = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub_instance

    async def close(self) -> None:
        channel, self._channel, self._stub_instance = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def infer(
        self,
        model: str,
        version: str,
        request: service_pb2.ModelInferRequest,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> service_pb2.ModelInferResponse:
        """`metadata`: what the call carries besides the routing headers (the job's request id, trace context)."""
        request.model_name = model
        request.model_version = version
        try:
            response: service_pb2.ModelInferResponse = await self._stub.ModelInfer(
                request, timeout=self._timeout_s, metadata=[*metadata, *model_headers(model, version)]
            )
        except grpc.aio.AioRpcError as error:
            raise InferenceFailure(error.code(), error.details() or "") from error
        return response

    async def model_shape(self, model: str, version: str) -> ModelShape:
        """max_batch_size and input dims from ModelConfig; an endpoint without it means "no packing"."""
        key = (model, version)
        cached = self._shapes.get(key)
        if cached and time.monotonic() - cached[0] < self._config_ttl_s:
            return cached[1]
        async with self._shape_locks.setdefault(key, asyncio.Lock()):
            cached = self._shapes.get(key)
            if cached and time.monotonic() - cached[0] < self._config_ttl_s:
                return cached[1]
            try:
                reply = await self._stub.ModelConfig(
                    service_pb2.ModelConfigRequest(name=model, version=version),
                    timeout=self._timeout_s,
                    metadata=model_headers(model, version),
                )
            except grpc.aio.AioRpcError as error:
                if error.code() in PERMANENT_CODES:
                    # Unknown to the endpoint's config API: send items one by one and let ModelInfer judge.
                    shape = ModelShape(0, {})
                    self._shapes[key] = (time.monotonic(), shape)
                    return shape
                raise InferenceFailure(error.code(), error.details() or "") from error
            config = reply.config
            shape = ModelShape(
                max_batch_size=int(config.max_batch_size),
                input_dims={i.name: tuple(int(d) for d in i.dims) for i in config.input},
            )
            self._shapes[key] = (time.monotonic(), shape)
            return shape
