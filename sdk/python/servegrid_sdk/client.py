"""A small typed client for servegrid's public gRPC API (Envoy's port or the gateway directly)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

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


def refresh_time(reply: gateway_pb2.CreateAccessTokenResponse, now: float) -> float:
    """When to exchange again: in the last fifth of the token's lifetime, at most a minute before it ends."""
    expires_at = float(reply.expire_time.seconds) or now + reply.expires_in
    return expires_at - min(max(expires_at - now, 0.0) / 5, 60.0)


class ApiKeyCredential:
    """An API key, exchanged once for a short-lived JWT (AuthService.CreateAccessToken) and reused.

    Envoy verifies the JWT by itself, so calls made with it cost no key check per request; the
    token is exchanged again a little before it expires (a fifth of its lifetime, at most a minute).
    A server without the exchange (UNIMPLEMENTED) gets the key itself on every call instead.
    Thread-safe: one exchange at a time, shared by every call of the client."""

    def __init__(self, channel: grpc.Channel, api_key: str, *, clock: Callable[[], float] = time.time) -> None:
        self._stub = gateway_pb2_grpc.AuthServiceStub(channel)
        self._api_key = api_key
        self._clock = clock
        self._lock = threading.Lock()
        self._token = ""
        self._refresh_at = 0.0
        self._plain = False  # the server cannot exchange: send the key itself
        self.exchanges = 0

    def metadata(self, timeout_s: float) -> list[tuple[str, str]]:
        with self._lock:
            if not self._plain and (not self._token or self._clock() >= self._refresh_at):
                self._exchange(timeout_s)
            if self._plain:
                return [("x-api-key", self._api_key)]
            return [("authorization", f"Bearer {self._token}")]

    def invalidate(self) -> bool:
        """Forget the token (the server refused it) so the next call exchanges again; False when no
        token was in use (the key itself was refused)."""
        with self._lock:
            had, self._token = bool(self._token) and not self._plain, ""
            return had

    def _exchange(self, timeout_s: float) -> None:
        try:
            reply = self._stub.CreateAccessToken(
                gateway_pb2.CreateAccessTokenRequest(), metadata=[("x-api-key", self._api_key)], timeout=timeout_s
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._plain = True
                return
            raise ServegridError.from_rpc_error(err) from None
        self.exchanges += 1
        self._token = reply.access_token
        self._refresh_at = refresh_time(reply, self._clock())


@dataclass(frozen=True)
class InferResult:
    """What a model answered."""

    model_id: str
    version: int
    request_id: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)


def tls_credentials(credentials: grpc.ChannelCredentials | None, ca_file: str | None) -> grpc.ChannelCredentials | None:
    """`credentials` as given, else TLS verified with `ca_file` (a private CA, e.g. a local stack's
    .servegrid/certs/ca.crt); None: plaintext."""
    if credentials is not None or not ca_file:
        return credentials
    with open(ca_file, "rb") as pem:
        return grpc.ssl_channel_credentials(root_certificates=pem.read())


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


Inputs = Mapping[str, "np.ndarray | list[object]"]


def needs_signature(inputs: Inputs) -> bool:
    """Plain Python values take the model's declared datatypes, which GetModel tells (once per model)."""
    return any(not isinstance(value, np.ndarray) for value in inputs.values())


def declared_datatypes(model: gateway_pb2.Model) -> dict[str, str]:
    return {spec.name: spec.datatype for spec in model.inputs}


# The headers the data plane routes KServe calls on (services/mesh/names.py has the same names; a unit
# test holds them equal). The gateway sets them itself upstream; sent here as well, a call through the
# public port names its model to Envoy (access log, per-model stats) as every servegrid client does.
MODEL_HEADER = "x-servegrid-model"
VERSION_HEADER = "x-servegrid-model-version"


def model_metadata(model_id: str, version: int = 0) -> list[tuple[str, str]]:
    """The model (and, when pinned, version) headers of a call for `model_id`."""
    headers = [(MODEL_HEADER, model_id)]
    if version:
        headers.append((VERSION_HEADER, str(version)))
    return headers


def infer_request(
    model_id: str,
    inputs: Inputs,
    declared: Mapping[str, str],
    *,
    version: int = 0,
    output_names: Iterable[str] = (),
    request_id: str = "",
) -> gateway_pb2.InferRequest:
    return gateway_pb2.InferRequest(
        model_id=model_id,
        version=version,
        inputs=[to_tensor(name, array, declared.get(name)) for name, array in inputs.items()],
        output_names=list(output_names),
        request_id=request_id or uuid.uuid4().hex,
    )


def infer_result(reply: gateway_pb2.InferResponse) -> InferResult:
    return InferResult(reply.model_id, reply.version, reply.request_id, {t.name: from_tensor(t) for t in reply.outputs})


def batch_job_request(
    model_id: str,
    items: Iterable[Inputs],
    declared: Mapping[str, str],
    *,
    idempotency_key: str | None = None,
    version: int = 0,
    priority: int = 0,
) -> gateway_pb2.CreateBatchJobRequest:
    return gateway_pb2.CreateBatchJobRequest(
        model_id=model_id,
        version=version,
        priority=priority,
        idempotency_key=idempotency_key or uuid.uuid4().hex,
        items=batch_pb2.BatchItems(
            items=[
                batch_pb2.BatchItem(item_id=str(i), inputs=[to_tensor(n, a, declared.get(n)) for n, a in item.items()])
                for i, item in enumerate(items)
            ]
        ),
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
        ca_file: str | None = None,
        exchange_api_key: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`api_key` is exchanged for a short-lived token on first use (`exchange_api_key=False` sends
        the key on every call instead); `token` is sent as it is. `credentials` (e.g.
        `grpc.ssl_channel_credentials()` for a public certificate) or `ca_file` (a private CA's PEM)
        speak TLS; neither: plaintext."""
        credentials = tls_credentials(credentials, ca_file)
        options = [("grpc.service_config", _retry_config(max_attempts)), ("grpc.enable_retries", 1)]
        self._channel = (
            grpc.secure_channel(target, credentials, options=options)
            if credentials
            else grpc.insecure_channel(target, options=options)
        )
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._static: list[tuple[str, str]] = []
        self.api_key: ApiKeyCredential | None = None
        if token:
            self._static.append(("authorization", f"Bearer {token}"))
        elif api_key and exchange_api_key:
            self.api_key = ApiKeyCredential(self._channel, api_key, clock=clock)
        elif api_key:
            self._static.append(("x-api-key", api_key))
        self.timeout_s = timeout_s
        self._signatures: dict[str, dict[str, str]] = {}  # model id -> input name -> declared datatype

    @property
    def _metadata(self) -> list[tuple[str, str]]:
        if self.api_key is None:
            return self._static
        return self.api_key.metadata(self.timeout_s)

    def _call(
        self, method: str, request: object, timeout_s: float | None = None, headers: list[tuple[str, str]] | None = None
    ) -> object:
        for attempt in (1, 2):
            try:
                return getattr(self._stub, method)(
                    request, timeout=timeout_s or self.timeout_s, metadata=[*self._metadata, *(headers or ())]
                )
            except grpc.RpcError as err:
                # An exchanged token the server no longer accepts (its signing key changed, a clock
                # jumped): exchange once more and repeat; the key itself is checked again there.
                refused = err.code() == grpc.StatusCode.UNAUTHENTICATED
                if attempt == 1 and refused and self.api_key is not None and self.api_key.invalidate():
                    continue
                raise ServegridError.from_rpc_error(err) from None
        raise AssertionError("unreachable")

    def infer(
        self,
        model_id: str,
        inputs: Inputs,
        *,
        version: int = 0,
        output_names: Iterable[str] = (),
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> InferResult:
        """Run one inference; `inputs` maps each input name to an array (or plain Python values,
        which take the model's declared datatype)."""
        declared = self._declared(model_id) if needs_signature(inputs) else {}
        request = infer_request(
            model_id, inputs, declared, version=version, output_names=output_names, request_id=request_id
        )
        reply: gateway_pb2.InferResponse = self._call(  # type: ignore[assignment]
            "Infer", request, timeout_s, model_metadata(model_id, version)
        )
        return infer_result(reply)

    def _declared(self, model_id: str) -> dict[str, str]:
        if model_id not in self._signatures:
            self._signatures[model_id] = declared_datatypes(self.get_model(model_id))
        return self._signatures[model_id]

    def list_models(self, page_size: int = 0) -> Iterator[gateway_pb2.Model]:
        """Every servable model, fetching pages as needed."""
        yield from self._paged("ListModels", gateway_pb2.ListModelsRequest(page_size=page_size), "models")

    def _paged(self, method: str, request: Any, field: str) -> Iterator[Any]:
        """Every item of a List RPC, following next_page_token from page to page."""
        while True:
            reply: Any = self._call(method, request)
            yield from getattr(reply, field)
            if not reply.next_page_token:
                return
            request.page_token = reply.next_page_token

    def get_model(self, model_id: str) -> gateway_pb2.Model:
        reply: gateway_pb2.GetModelResponse = self._call(  # type: ignore[assignment]
            "GetModel", gateway_pb2.GetModelRequest(model_id=model_id)
        )
        return reply.model

    def create_batch_job(
        self,
        model_id: str,
        items: Iterable[Inputs],
        *,
        idempotency_key: str | None = None,
        version: int = 0,
        priority: int = 0,
    ) -> batch_pb2.BatchJob:
        """Submit a job; resubmitting with the same idempotency key returns the same job."""
        items = list(items)
        declared = self._declared(model_id) if any(needs_signature(item) for item in items) else {}
        request = batch_job_request(
            model_id, items, declared, idempotency_key=idempotency_key, version=version, priority=priority
        )
        reply: gateway_pb2.CreateBatchJobResponse = self._call("CreateBatchJob", request)  # type: ignore[assignment]
        return reply.job

    def get_batch_job(self, job_id: str) -> batch_pb2.BatchJobProgress:
        """A job and its progress (items per second, estimated seconds left)."""
        reply: gateway_pb2.GetBatchJobResponse = self._call(  # type: ignore[assignment]
            "GetBatchJob", gateway_pb2.GetBatchJobRequest(job_id=job_id)
        )
        return reply.progress

    def list_batch_jobs(self, page_size: int = 0) -> Iterator[batch_pb2.BatchJob]:
        """The caller's jobs, newest first, fetching pages as needed."""
        yield from self._paged("ListBatchJobs", gateway_pb2.ListBatchJobsRequest(page_size=page_size), "jobs")

    def cancel_batch_job(self, job_id: str) -> batch_pb2.BatchJob:
        """No new items start; items in flight finish. Cancelling an ended job is FAILED_PRECONDITION."""
        reply: gateway_pb2.CancelBatchJobResponse = self._call(  # type: ignore[assignment]
            "CancelBatchJob", gateway_pb2.CancelBatchJobRequest(job_id=job_id)
        )
        return reply.job

    def retry_batch_job(self, job_id: str) -> tuple[batch_pb2.BatchJob, int]:
        """Run the job's failed items again; returns the job and how many items were requeued."""
        reply: gateway_pb2.RetryBatchJobResponse = self._call(  # type: ignore[assignment]
            "RetryBatchJob", gateway_pb2.RetryBatchJobRequest(job_id=job_id)
        )
        return reply.job, reply.requeued_items

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
