"""Test helpers for the router: run it on its own event-loop thread, a delay proxy, and a fake registry."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from servegrid.registry.v1 import registry_pb2 as rpb

from services.router.server import Router, build_router
from services.router.settings import RouterSettings

T = TypeVar("T")


class RouterThread:
    """A router serving from a background thread's event loop.

    Its own loop lets blocking clients (tritonclient's sync InferenceServerClient) and the test's
    loop call it, and keeps router CPU time apart from the test's in profiles.
    """

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="router", daemon=True)
        self.router: Router

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run on the router's loop from another loop without blocking that loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def start_loop(self) -> RouterThread:
        """Only the loop thread, for helpers (proxies) that need a loop of their own but no router."""
        self._thread.start()
        return self

    def stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def start(self) -> RouterThread:
        self.start_loop()

        async def build() -> Router:
            router = build_router(self.settings)
            await router.app.start()
            return router

        self.router = self.run(build())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.router.app.port}"

    def push(self, message: rpb.WatchRoutesResponse) -> None:
        """Apply a table change on the router's loop, as the registry stream would."""

        async def apply() -> None:
            self.router.table.apply_watch(message)

        self.run(apply())

    def stop(self) -> None:
        try:
            self.run(self.router.app.stop())
        finally:
            self.stop_loop()


def write_routes(path: Path, routes: Sequence[rpb.Route], revision: int = 1) -> Path:
    path.write_text(json_format.MessageToJson(rpb.WatchRoutesResponse(reset=True, routes=routes, revision=revision)))
    return path


def route(
    model_id: str,
    versions: Sequence[tuple[int, str, int, Sequence[tuple[str, str]]]],
    *,
    load_balancing: int = 0,
    sticky_header: str = "",
    shadow: tuple[int, str, Sequence[tuple[str, str]], float] | None = None,
) -> rpb.Route:
    """A Route from (version, triton model, weight, [(backend id, address)]) tuples."""

    def version(number: int, triton: str, weight: int, backends: Sequence[tuple[str, str]]) -> rpb.RouteVersion:
        return rpb.RouteVersion(
            version=number,
            stage=rpb.STAGE_PRODUCTION if weight else rpb.STAGE_STAGING,
            triton_model_name=triton,
            weight=weight,
            backends=[rpb.RouteBackend(backend_id=b, address=a, weight=1) for b, a in backends],
        )

    message = rpb.Route(
        model_id=model_id,
        versions=[version(*v) for v in versions],
        load_balancing=load_balancing,  # type: ignore[arg-type]
        sticky_header=sticky_header,
    )
    if shadow is not None:
        number, triton, backends, rate = shadow
        message.shadow.target.CopyFrom(version(number, triton, 0, backends))
        message.shadow.sample_rate = rate
    return message


class DelayProxy(grpc.GenericRpcHandler):
    """Forwards every call to `target` as raw bytes, ModelInfer after `delay_s`: a slow backend on demand."""

    def __init__(self, target: str, delay_s: float) -> None:
        self.target = target
        self.delay_s = delay_s
        self.calls = 0
        self._channel: grpc.aio.Channel | None = None
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> DelayProxy:
        self._channel = grpc.aio.insecure_channel(self.target)
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self._server.add_generic_rpc_handlers((self,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = details.method
        assert self._channel is not None
        call = self._channel.unary_unary(method)
        delayed = method.endswith("/ModelInfer")

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if delayed:
                self.calls += 1
                await asyncio.sleep(self.delay_s)
            try:
                response: bytes = await call(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as error:
                await context.abort(error.code(), error.details() or "")
            return response

        return grpc.unary_unary_rpc_method_handler(forward)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
        if self._channel is not None:
            await self._channel.close()


class FakeRegistry:
    """WatchRoutes only: the whole table first (reset), then whatever the test pushes."""

    def __init__(self, routes: Sequence[rpb.Route]) -> None:
        self.routes = list(routes)
        self.revision = 1
        self.watchers = 0
        self._queues: list[asyncio.Queue[rpb.WatchRoutesResponse]] = []
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def WatchRoutes(self, request: rpb.WatchRoutesRequest, context: grpc.aio.ServicerContext) -> Any:
        queue: asyncio.Queue[rpb.WatchRoutesResponse] = asyncio.Queue()
        self._queues.append(queue)
        self.watchers += 1
        try:
            yield rpb.WatchRoutesResponse(reset=True, routes=self.routes, revision=self.revision)
            while True:
                yield await queue.get()
        finally:
            self._queues.remove(queue)

    def push(self, upserts: Sequence[rpb.Route] = (), removed: Sequence[str] = ()) -> None:
        self.revision += 1
        by_id = {r.model_id: r for r in self.routes}
        by_id.update({r.model_id: r for r in upserts})
        for model_id in removed:
            by_id.pop(model_id, None)
        self.routes = list(by_id.values())
        change = rpb.WatchRoutesResponse(routes=upserts, removed_model_ids=removed, revision=self.revision)
        for queue in self._queues:
            queue.put_nowait(change)

    async def start(self, port: int = 0) -> FakeRegistry:
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        handler = grpc.method_handlers_generic_handler(
            "servegrid.registry.v1.RegistryService",
            {
                "WatchRoutes": grpc.unary_stream_rpc_method_handler(
                    self.WatchRoutes,
                    request_deserializer=rpb.WatchRoutesRequest.FromString,
                    response_serializer=rpb.WatchRoutesResponse.SerializeToString,
                )
            },
        )
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        await self._server.start()
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0, poll_s: float = 0.02) -> float:
    """Poll `condition` (state owned by another thread or process); returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(poll_s)
    return time.monotonic() - started
