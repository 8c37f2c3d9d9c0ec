"""The KServe v2 data plane: ModelInfer forwarded as raw bytes, plus the metadata and readiness calls."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from tritonclient.grpc import service_pb2

from services.router import metrics
from services.router.backends import Backend, BackendPool
from services.router.balancer import Balancer
from services.router.retry import RETRY_HEADER, RetryBudget, backoff_s, retryable
from services.router.settings import RouterSettings
from services.router.shadow import ShadowMirror
from services.router.table import CompiledRoute, RouteTable, VersionTarget
from services.router.wire import encode_head, read_head, split_head
from services.runtime.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ServegridError,
    Unavailable,
    abort_with,
    internal_status,
)

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "servegrid-router"
SERVER_VERSION = "0.1.0"
_parse_request = service_pb2.ModelInferRequest.FromString
_parse_response = service_pb2.ModelInferResponse.FromString
T = TypeVar("T")


class BackendError(Exception):
    """A backend's own error status, passed to the caller as it is (Triton's code and message)."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__(error.details())
        self.error = error


class InferenceForwarder:
    """Routes each call by model id and version through the table, picks a backend, forwards, retries."""

    def __init__(self, table: RouteTable, pool: BackendPool, settings: RouterSettings, shadow: ShadowMirror) -> None:
        self.table = table
        self.pool = pool
        self.settings = settings
        self.shadow = shadow
        self.budget = RetryBudget(
            settings.retry_budget_ratio, settings.retry_budget_min_per_s, settings.retry_budget_cap
        )
        self._balancers: dict[tuple[str, int, int], Balancer] = {}
        # Labelled metric children are looked up once per label set: `labels()` costs a lock and a hash.
        self._counters: dict[tuple[str, str, str, str], Any] = {}
        self._latency: dict[tuple[str, str], Any] = {}
        self._response_heads: dict[tuple[str, str], bytes] = {}

    # ---- the hot path -------------------------------------------------------------------------

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        head = read_head(request)
        if head is None:
            name, version, body = split_head(request, _parse_request)
        else:
            name, version, offset = head
            body = b""
        version_label = version or "default"
        backend_id = "none"
        code = "OK"
        try:
            route = self.table.routes.get(name)
            if route is None:
                route = self.table.get(name)  # raises MODEL_NOT_FOUND
            opt_in, sticky = self._read_metadata(context, route.sticky_header)
            target = route.pick_version(version, sticky)
            version_label = target.version_str
            if head is not None:
                if (name, version) == target.backend_key:
                    outgoing = request  # the caller already speaks the backend's names: no copy at all
                else:
                    # One copy of the payload (a slice and then `+` would make two).
                    body = memoryview(request)[offset:]
                    outgoing = b"".join((target.request_head, body))
            else:
                outgoing = b"".join((target.request_head, body))
            backend, response = await self._forward(route, target, outgoing, context, opt_in)
            backend_id = backend.backend_id
            response = self._rename_response(response, name, target.version_str)
            if route.shadow is not None and random.random() < route.shadow_rate:
                if head is not None and not body:
                    body = memoryview(request)[offset:]
                self.shadow.submit(route.shadow, route.load_balancing, body, response)
            return response
        except ServegridError as error:
            code = error.code.name
            await _abort(context, error)
        except BackendError as failure:
            code = failure.error.code().name
            await _abort_backend(context, failure)
        except Exception:
            # ModelInfer skips the runtime's interceptor, so it does that interceptor's job here:
            # nothing about the failure reaches the caller, the traceback goes to the log.
            code = "INTERNAL"
            log.exception("ModelInfer for model %r failed unexpectedly", name)
            await _abort_internal(context)
        finally:
            self._record(name, version_label, backend_id, code, started)

    def _read_metadata(self, context: grpc.aio.ServicerContext, sticky_header: str) -> tuple[bool, str | None]:
        opt_in = False
        sticky = None
        for key, value in context.invocation_metadata() or ():
            if key == RETRY_HEADER:
                opt_in = str(value).lower() in ("true", "1", "yes")
            elif sticky_header and key == sticky_header:
                sticky = value if isinstance(value, str) else value.decode(errors="replace")
        return opt_in, sticky

    async def _forward(
        self,
        route: CompiledRoute,
        target: VersionTarget,
        outgoing: bytes,
        context: grpc.aio.ServicerContext,
        opt_in: bool,
    ) -> tuple[Backend, bytes]:
        """One call with budgeted retries; a retry goes to another backend when one is eligible."""
        self.budget.deposit()
        balancer = self._balancer(route, target)
        settings = self.settings
        previous: Backend | None = None
        attempt = 0
        while True:
            attempt += 1
            now = time.monotonic()
            candidates = self.pool.candidates(target.backend_ids, target.backend_key, now)
            if previous is not None and len(candidates) > 1 and previous in candidates:
                candidates.remove(previous)
            if not candidates:
                raise Unavailable(
                    f"no healthy backend for model {route.model_id!r} version {target.version}",
                    reason="NO_HEALTHY_BACKEND",
                    metadata={"model_id": route.model_id, "version": target.version_str},
                )
            backend = balancer.pick(candidates, now)
            timeout = self._timeout(context, route.model_id)
            backend.in_flight += 1
            backend.breaker.on_send()
            sent = time.perf_counter()
            try:
                response: bytes = await backend.infer(outgoing, timeout=timeout)
            except asyncio.CancelledError:
                backend.breaker.release()  # the caller went away: no verdict on the backend
                raise
            except grpc.aio.AioRpcError as error:
                code = error.code()
                backend.on_failure(code, time.monotonic())
                if code is grpc.StatusCode.DEADLINE_EXCEEDED and time.perf_counter() - sent >= timeout - 0.001:
                    # Our own outgoing deadline (the caller's, less a margin) fired: say so with ErrorInfo.
                    raise _deadline(route.model_id) from None
                if attempt >= settings.retry_max_attempts or not retryable(code, opt_in):
                    raise BackendError(error) from None
                if not self.budget.try_withdraw():
                    metrics.RETRY_BUDGET_EXHAUSTED.labels(route.model_id).inc()
                    raise BackendError(error) from None
                metrics.RETRIES.labels(route.model_id, code.name).inc()
                pause = backoff_s(attempt, settings.retry_backoff_base_s, settings.retry_backoff_max_s)
                if pause:
                    await asyncio.sleep(pause)
                previous = backend
                continue
            finally:
                backend.in_flight -= 1
            backend.on_success(time.perf_counter() - sent, time.monotonic())
            return backend, response

    def _timeout(self, context: grpc.aio.ServicerContext, model_id: str) -> float:
        """The caller's remaining deadline, less a margin so our DEADLINE_EXCEEDED (with ErrorInfo) wins."""
        remaining = context.time_remaining()
        if remaining is None or remaining > 1e8:
            return self.settings.default_timeout_s
        remaining -= self.settings.deadline_margin_s
        if remaining <= 0:
            raise _deadline(model_id)
        return float(remaining)

    def _rename_response(self, response: bytes, name: str, version: str) -> bytes:
        head = read_head(response)
        if head is not None:
            if head[0] == name and head[1] == version:
                return response
            rest: bytes | memoryview = memoryview(response)[head[2] :]
        else:
            _, _, rest = split_head(response, _parse_response)
        key = (name, version)
        encoded = self._response_heads.get(key)
        if encoded is None:
            if len(self._response_heads) > 10_000:  # model names come from callers: bound the cache
                self._response_heads.clear()
            encoded = self._response_heads[key] = encode_head(name, version)
        return b"".join((encoded, rest))

    def _balancer(self, route: CompiledRoute, target: VersionTarget) -> Balancer:
        key = (route.model_id, target.version, route.load_balancing)
        balancer = self._balancers.get(key)
        if balancer is None:
            balancer = self._balancers[key] = Balancer(route.load_balancing)
        return balancer

    def _record(self, model: str, version: str, backend: str, code: str, started: float) -> None:
        if code == "NOT_FOUND":
            model, version = "unknown", "unknown"  # caller-chosen names must not grow label sets
        key = (model, version, backend, code)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = metrics.REQUESTS.labels(*key)
        counter.inc()
        histogram = self._latency.get((model, version))
        if histogram is None:
            histogram = self._latency[(model, version)] = metrics.LATENCY.labels(model, version)
        histogram.observe(time.perf_counter() - started)

    # ---- typed calls: readiness and metadata --------------------------------------------------

    async def _call_backend(
        self,
        target: VersionTarget,
        route: CompiledRoute,
        context: grpc.aio.ServicerContext,
        call: Callable[[Backend, float], Awaitable[T]],
    ) -> T:
        """A light call on an eligible backend, trying another once when the first is unreachable."""
        balancer = self._balancer(route, target)
        previous: Backend | None = None
        for attempt in (1, 2):
            now = time.monotonic()
            candidates = [
                b for b in self.pool.candidates(target.backend_ids, target.backend_key, now) if b is not previous
            ]
            if not candidates:
                raise Unavailable(
                    f"no healthy backend for model {route.model_id!r} version {target.version}",
                    reason="NO_HEALTHY_BACKEND",
                    metadata={"model_id": route.model_id, "version": target.version_str},
                )
            backend = balancer.pick(candidates, now)
            try:
                return await call(backend, self._timeout(context, route.model_id))
            except grpc.aio.AioRpcError as error:
                if attempt == 2 or error.code() is not grpc.StatusCode.UNAVAILABLE:
                    raise BackendError(error) from None
                previous = backend
        raise AssertionError("unreachable")

    async def _typed(self, context: grpc.aio.ServicerContext, work: Awaitable[T]) -> T:
        try:
            return await work
        except ServegridError as error:
            await _abort(context, error)
        except BackendError as failure:
            await _abort_backend(context, failure)

    async def model_ready(
        self, request: service_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelReadyResponse:
        async def work() -> service_pb2.ModelReadyResponse:
            route = self.table.get(request.name)
            target = route.pick_version(request.version)
            try:
                return await self._call_backend(
                    target,
                    route,
                    context,
                    lambda b, t: b.stub.ModelReady(
                        service_pb2.ModelReadyRequest(
                            name=target.triton_model_name, version=target.triton_model_version
                        ),
                        timeout=t,
                    ),
                )
            except Unavailable:
                return service_pb2.ModelReadyResponse(ready=False)

        return await self._typed(context, work())

    async def model_metadata(
        self, request: service_pb2.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelMetadataResponse:
        async def work() -> service_pb2.ModelMetadataResponse:
            route = self.table.get(request.name)
            target = route.pick_version(request.version)
            reply: service_pb2.ModelMetadataResponse = await self._call_backend(
                target,
                route,
                context,
                lambda b, t: b.stub.ModelMetadata(
                    service_pb2.ModelMetadataRequest(
                        name=target.triton_model_name, version=target.triton_model_version
                    ),
                    timeout=t,
                ),
            )
            reply.name = request.name
            versions = [target.version_str] if request.version else [str(v) for v in sorted(route.versions)]
            del reply.versions[:]
            reply.versions.extend(versions)
            return reply

        return await self._typed(context, work())

    async def model_config(
        self, request: service_pb2.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelConfigResponse:
        async def work() -> service_pb2.ModelConfigResponse:
            route = self.table.get(request.name)
            target = route.pick_version(request.version)
            reply: service_pb2.ModelConfigResponse = await self._call_backend(
                target,
                route,
                context,
                lambda b, t: b.stub.ModelConfig(
                    service_pb2.ModelConfigRequest(name=target.triton_model_name, version=target.triton_model_version),
                    timeout=t,
                ),
            )
            reply.config.name = request.name
            return reply

        return await self._typed(context, work())

    async def model_statistics(
        self, request: service_pb2.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelStatisticsResponse:
        async def work() -> service_pb2.ModelStatisticsResponse:
            if not request.name:
                raise InvalidArgument("name a model: the router serves statistics per model", reason="INVALID_ARGUMENT")
            route = self.table.get(request.name)
            target = route.pick_version(request.version)
            reply: service_pb2.ModelStatisticsResponse = await self._call_backend(
                target,
                route,
                context,
                lambda b, t: b.stub.ModelStatistics(
                    service_pb2.ModelStatisticsRequest(
                        name=target.triton_model_name, version=target.triton_model_version
                    ),
                    timeout=t,
                ),
            )
            for stats in reply.model_stats:
                stats.name = request.name
                stats.version = target.version_str
            return reply

        return await self._typed(context, work())

    async def server_live(
        self, request: service_pb2.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=True)

    async def server_ready(
        self, request: service_pb2.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerReadyResponse:
        now = time.monotonic()
        ready = any(b.eligible(key, now) for b in self.pool.backends.values() for key in b.models or {("", "")})
        return service_pb2.ServerReadyResponse(ready=ready)

    async def server_metadata(
        self, request: service_pb2.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerMetadataResponse:
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

    def handler(self) -> grpc.GenericRpcHandler:
        """One generic handler for the KServe v2 service: ModelInfer raw, the rest typed."""

        def typed(behavior: Callable[..., Any], request_type: Any, response_type: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                behavior,
                request_deserializer=request_type.FromString,
                response_serializer=response_type.SerializeToString,
            )

        pb = service_pb2
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                # No (de)serializers: request and response stay bytes end to end.
                "ModelInfer": grpc.unary_unary_rpc_method_handler(self.model_infer),
                "ModelReady": typed(self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
                "ModelMetadata": typed(self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
                "ModelConfig": typed(self.model_config, pb.ModelConfigRequest, pb.ModelConfigResponse),
                "ModelStatistics": typed(self.model_statistics, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
                "ServerLive": typed(self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
                "ServerReady": typed(self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
                "ServerMetadata": typed(self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            },
        )


def _deadline(model_id: str) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"deadline exceeded before model {model_id!r} answered",
        reason="DEADLINE_EXCEEDED",
        metadata={"model_id": model_id},
    )


async def _abort(context: grpc.aio.ServicerContext, error: ServegridError) -> NoReturn:
    """Abort with the status and its ErrorInfo ourselves: this handler must not rely on an interceptor."""
    await abort_with(context, error.to_grpc_status())


async def _abort_backend(context: grpc.aio.ServicerContext, failure: BackendError) -> NoReturn:
    """Pass the backend's status through: Triton's code and message reach the caller unchanged."""
    await context.abort(failure.error.code(), failure.error.details() or "")
    raise AssertionError("abort returns only by raising")


async def _abort_internal(context: grpc.aio.ServicerContext) -> NoReturn:
    await abort_with(context, internal_status())
