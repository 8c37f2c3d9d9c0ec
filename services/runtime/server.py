"""The grpc.aio server every service runs on: health, reflection, metrics, tracing, graceful drain."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.health import HealthReporter
from services.runtime.interceptors import RequestIdInterceptor, ServiceInterceptor
from services.runtime.logs import setup_logging
from services.runtime.metrics import TLS_CERTIFICATE_EXPIRY, serve_metrics
from services.runtime.peers import PeerAllowlist
from services.runtime.reflection import enable_reflection
from services.runtime.settings import ServiceSettings
from services.runtime.tls import server_credentials
from services.runtime.tracing import server_interceptors, setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)
_MAX_METADATA_BYTES = 64 * 1024

AddServicer = Callable[[Any, grpc.aio.Server], None]
Hook = Callable[[], Awaitable[object]]


class ServiceApp:
    """Composes one servegrid service process.

    A service's `server.py` builds its core objects, registers its servicers and health checks
    here, then calls `run()`:

        app = ServiceApp("registry", settings)
        app.add_servicer(add_RegistryServiceServicer_to_server, servicer, "servegrid.registry.v1.RegistryService")
        app.health.add_component("database", store.ping)
        app.on_shutdown(store.close)
        app.run()
    """

    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        *,
        extra_interceptors: list[grpc.aio.ServerInterceptor] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.health = HealthReporter([], interval_s=settings.health_interval_s)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self._servicers: list[tuple[AddServicer, Any, str]] = []
        self._generic_handlers: list[grpc.GenericRpcHandler] = []
        self._passthrough_methods: set[str] = set()
        self._reflected: set[str] = set()
        self._extra_interceptors = extra_interceptors or []
        self._startup: list[Hook] = []
        self._drain: list[Hook] = []
        self._shutdown: list[Hook] = []
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._stopping: asyncio.Event | None = None

    def add_servicer(
        self, add: AddServicer, servicer: Any, full_name: str, *, passthrough_methods: Iterable[str] = ()
    ) -> None:
        """Register a generated `add_XServicer_to_server` with its servicer and full service name.

        `servicer` may be an async factory (called at start, after the startup hooks, on the serving
        loop), for servicers whose clients must open their channels there. `passthrough_methods`
        (full names) skip the ServiceInterceptor's metrics wrapper: see add_generic_handler."""
        self._servicers.append((add, servicer, full_name))
        self._passthrough_methods.update(passthrough_methods)
        self.health.service_names.append(full_name)

    def add_generic_handler(
        self, handler: grpc.GenericRpcHandler, full_name: str, *, passthrough_methods: Iterable[str] = ()
    ) -> None:
        """Register a hand-made handler (for example one that forwards raw bytes).

        `passthrough_methods` (full names, "/pkg.Service/Method") skip the ServiceInterceptor: use it
        only for hot paths that abort with domain statuses and record metrics themselves.
        """
        self._generic_handlers.append(handler)
        self._passthrough_methods.update(passthrough_methods)
        self.health.service_names.append(full_name)

    def reflect(self, full_names: Iterable[str]) -> None:
        """Also list these services in reflection (v1 and v1alpha), though this process does not serve them:
        the gateway answers reflection for Envoy's whole public port. Each must be in the default
        descriptor pool (its generated module imported)."""
        self._reflected.update(full_names)

    def on_startup(self, hook: Hook) -> None:
        """Run before the port opens (connect pools, run migrations)."""
        self._startup.append(hook)

    def on_drain(self, hook: Hook) -> None:
        """Run once new calls are refused, before waiting on calls in flight: end streams that never
        finish on their own (watch streams), so shutdown need not wait out the whole grace period."""
        self._drain.append(hook)

    def on_shutdown(self, hook: Hook) -> None:
        """Run after calls have drained (close pools, flush producers), in reverse order."""
        self._shutdown.append(hook)

    async def start(self) -> int:
        """Start serving; returns the bound port."""
        s = self.settings
        setup_tracing(f"servegrid-{self.name}")
        for hook in self._startup:
            await hook()
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            # Above Envoy's 60 KiB request-header cap: whatever Envoy forwards reaches the handler, which
            # answers it (a 32 KiB API key is API_KEY_INVALID), instead of gRPC's default 8 KiB soft /
            # 16 KiB hard limits refusing it, at random in between, as RESOURCE_EXHAUSTED.
            ("grpc.max_metadata_size", _MAX_METADATA_BYTES),
            ("grpc.absolute_max_metadata_size", _MAX_METADATA_BYTES),
            ("grpc.so_reuseport", 0),
        ]
        # Inside the ServiceInterceptor (a refusal is counted like any other status), before the handler.
        allowlist = [PeerAllowlist(self.name, s.tls_allowed_peers)] if s.tls is not None and s.tls_allowed_peers else []
        server = grpc.aio.server(
            interceptors=[
                RequestIdInterceptor(),
                *server_interceptors(),
                ServiceInterceptor(self._passthrough_methods),
                *allowlist,
                *self._extra_interceptors,
            ],
            options=options,
        )
        for add, servicer, _ in self._servicers:
            add(await servicer() if inspect.iscoroutinefunction(servicer) else servicer, server)
        if self._generic_handlers:
            server.add_generic_rpc_handlers(tuple(self._generic_handlers))
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        names = [full for *_, full in self._servicers] + self.health.service_names[1:]
        health = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        enable_reflection(server, {*names, *self._reflected, health})
        self.port = self._bind(server)
        await self.health.refresh()
        self.health.start()
        await server.start()
        self._server = server
        if s.health_port is not None:
            self.health_port = await self._start_health_server(s.health_port)
        if s.metrics_port is not None:
            self.metrics_port = serve_metrics(s.host, s.metrics_port)
        log.info(
            "%s serving",
            self.name,
            extra={"port": self.port, "metrics_port": self.metrics_port, "tls": s.tls is not None},
        )
        if s.ready_file:
            s.ready_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = s.ready_file.with_suffix(".tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "port": self.port,
                        "metrics_port": self.metrics_port,
                        "health_port": self.health_port,
                        "pid": os.getpid(),
                    }
                )
            )
            tmp.replace(s.ready_file)
        return self.port

    def _bind(self, server: grpc.aio.Server) -> int:
        """The service port: mutual TLS when the settings name a certificate, plaintext otherwise."""
        s = self.settings
        address = f"{s.host}:{s.port}"
        tls = s.tls
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, server_credentials(tls))
            TLS_CERTIFICATE_EXPIRY.labels("mesh").set(tls.not_after())
        if port == 0:
            raise RuntimeError(f"could not bind {address}")
        return port

    async def _start_health_server(self, port: int) -> int:
        """A plaintext port with the health service alone: probes that cannot present a certificate
        learn whether the service is up and nothing else (no other service is registered on it)."""
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        bound = server.add_insecure_port(f"{self.settings.host}:{port}")
        if bound == 0:
            raise RuntimeError(f"could not bind the health port {self.settings.host}:{port}")
        await server.start()
        self._health_server = server
        return bound

    async def stop(self) -> None:
        """Graceful drain: NOT_SERVING, optional delay, refuse new calls, let calls in flight finish."""
        if self._server is None:
            return
        server, self._server = self._server, None
        log.info("%s draining", self.name, extra={"grace_period_s": self.settings.grace_period_s})
        await self.health.enter_graceful_shutdown()
        if self.settings.shutdown_delay_s:
            await asyncio.sleep(self.settings.shutdown_delay_s)
        stopped = asyncio.ensure_future(server.stop(self.settings.grace_period_s))
        await asyncio.sleep(0)  # let stop() close the door to new calls before streams are ended
        for hook in self._drain:
            try:
                await hook()
            except Exception:
                log.exception("drain hook failed")
        await stopped
        if self._health_server is not None:
            await self._health_server.stop(0)
            self._health_server = None
        for hook in reversed(self._shutdown):
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
        shutdown_tracing()
        log.info("%s stopped", self.name)

    async def serve(self) -> None:
        """Start, wait for SIGTERM or SIGINT, then drain and stop."""
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self.start()
        await self._stopping.wait()
        await self.stop()

    def run(self) -> None:
        """Process entry point: logging, the event loop (uvloop when enabled), serve until signalled."""
        setup_logging(self.name, self.settings.log_level, self.settings.log_format)
        if self.settings.use_uvloop:
            import uvloop

            uvloop.run(self.serve())
        else:
            asyncio.run(self.serve())
        exit_after_python_cleanup(0)


def exit_after_python_cleanup(code: int) -> NoReturn:
    """End a process whose work is done: run Python's exit handlers (logging, tracing, coverage data),
    flush stdout/stderr, then leave without the C library's. grpcio's OpenSSL teardown, one of those,
    waits up to 2 s for gRPC core objects that interpreter shutdown never frees (grpc/grpc#38539), so
    every process that served or dialled TLS took 2 s longer to stop than its drain."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
