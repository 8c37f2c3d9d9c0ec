"""A small typed client for servegrid's public gRPC API (Envoy's port or the gateway directly)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType

import grpc
import numpy as np
from google.rpc import error_details_pb2, status_pb2
from servegrid.batch.v1 import batch_pb2
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from servegrid_sdk.tensors import from_tensor, to_tensor

_SERVICE = "servegrid.gateway.v1.GatewayService"


class ServegridError(Exception):
    """A failed call: the gRPC status code, the server's message and its ErrorInfo reason."""

    def __init__(
        self, code: grpc.StatusCode, message: str, reason: str = "", metadata: Mapping[str, str] | None = None
    ):
        super().__init__(f"{code.name}: {message}" + (f" ({reason})" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> ServegridError:
        call: grpc.Call = err
        reason, metadata = "", {}
        for key, value in call.trailing_metadata() or ():
            if key == "grpc-status-details-bin" and isinstance(value, bytes):
                for detail in status_pb2.Status.FromString(value).details:
                    info = error_details_pb2.ErrorInfo()
                    if detail.Unpack(info):
                        reason, metadata = info.reason, dict(info.metadata)
        return cls(call.code(), call.details() or "", reason, metadata)


@dataclass(frozen=True)
class InferResult:
    """What a model answered."""

    model_id: str
    version: int
    request_id: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)


def _retry_config(max_attempts: int) -> str:
    # Transparent retries by grpc itself, only for UNAVAILABLE: inference has no side effects and
    # batch submits carry an idempotency key, so a retried call never does work twice.
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": _SERVICE}],
                    "retryPolicy": {
                        "maxAttempts": max(2, min(max_attempts, 5)),
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


class ServegridClient:
    """Calls servegrid's GatewayService with credentials, a default deadline and safe retries.

    >>> with ServegridClient("127.0.0.1:8080", token=jwt) as sg:
    ...     result = sg.infer("digits", {"pixels": np.zeros((1, 64), np.float32)})
    ...     result.outputs["label"]
    """

    def __init__(
        self,
        target: str = "127.0.0.1:8080",
        *,
        token: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        max_attempts: int = 3,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        options = [("grpc.service_config", _retry_config(max_attempts)), ("grpc.enable_retries", 1)]
        self._channel = (
            grpc.secure_channel(target, credentials, options=options)
            if credentials
            else grpc.insecure_channel(target, options=options)
        )
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._metadata: list[tuple[str, str]] = []
        if token:
            self._metadata.append(("authorization", f"Bearer {token}"))
        if api_key:
            self._metadata.append(("x-api-key", api_key))
        self.timeout_s = timeout_s

    def _call(self, method: str, request: object, timeout_s: float | None = None) -> object:
        try:
            return getattr(self._stub, method)(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as err:
            raise ServegridError.from_rpc_error(err) from None

    def infer(
        self,
        model_id: str,
        inputs: Mapping[str, np.ndarray | list[object]],
        *,
        version: int = 0,
        output_names: Iterable[str] = (),
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> InferResult:
        """Run one inference; `inputs` maps each input name to an array."""
        request = gateway_pb2.InferRequest(
            model_id=model_id,
            version=version,
            inputs=[to_tensor(name, array) for name, array in inputs.items()],
            output_names=list(output_names),
            request_id=request_id or uuid.uuid4().hex,
        )
        reply: gateway_pb2.InferResponse = self._call("Infer", request, timeout_s)  # type: ignore[assignment]
        return InferResult(
            reply.model_id, reply.version, reply.request_id, {t.name: from_tensor(t) for t in reply.outputs}
        )

    def list_models(self, page_size: int = 0) -> Iterator[gateway_pb2.Model]:
        """Every servable model, fetching pages as needed."""
        token = ""
        while True:
            reply: gateway_pb2.ListModelsResponse = self._call(  # type: ignore[assignment]
                "ListModels", gateway_pb2.ListModelsRequest(page_size=page_size, page_token=token)
            )
            yield from reply.models
            token = reply.next_page_token
            if not token:
                return

    def get_model(self, model_id: str) -> gateway_pb2.Model:
        reply: gateway_pb2.GetModelResponse = self._call(  # type: ignore[assignment]
            "GetModel", gateway_pb2.GetModelRequest(model_id=model_id)
        )
        return reply.model

    def create_batch_job(
        self,
        model_id: str,
        items: Iterable[Mapping[str, np.ndarray | list[object]]],
        *,
        idempotency_key: str | None = None,
        version: int = 0,
        priority: int = 0,
    ) -> batch_pb2.BatchJob:
        """Submit a job; resubmitting with the same idempotency key returns the same job."""
        request = gateway_pb2.CreateBatchJobRequest(
            model_id=model_id,
            version=version,
            priority=priority,
            idempotency_key=idempotency_key or uuid.uuid4().hex,
            items=batch_pb2.BatchItems(
                items=[
                    batch_pb2.BatchItem(item_id=str(i), inputs=[to_tensor(n, a) for n, a in item.items()])
                    for i, item in enumerate(items)
                ]
            ),
        )
        reply: gateway_pb2.CreateBatchJobResponse = self._call("CreateBatchJob", request)  # type: ignore[assignment]
        return reply.job

    def watch_batch_job(self, job_id: str) -> Iterator[batch_pb2.BatchJobProgress]:
        """Progress updates until the job ends."""
        try:
            for reply in self._stub.WatchBatchJob(
                gateway_pb2.WatchBatchJobRequest(job_id=job_id), metadata=self._metadata
            ):
                yield reply.progress
        except grpc.RpcError as err:
            raise ServegridError.from_rpc_error(err) from None

    def batch_results(self, job_id: str) -> Iterator[batch_pb2.BatchResult]:
        """Every result of a job, in item order."""
        try:
            for reply in self._stub.StreamBatchJobResults(
                gateway_pb2.StreamBatchJobResultsRequest(job_id=job_id), metadata=self._metadata
            ):
                yield reply.result
        except grpc.RpcError as err:
            raise ServegridError.from_rpc_error(err) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ServegridClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
