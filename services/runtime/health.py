"""Per-component health behind the standard gRPC health service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from services.runtime.metrics import COMPONENT_UP

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

HealthCheck = Callable[[], Awaitable[object]]


@dataclass
class Component:
    """A dependency the service checks: a database, a cache, a broker, a backend pool."""

    name: str
    check: HealthCheck
    # A required component that fails makes the whole service NOT_SERVING; an optional one (a
    # cache the service can work without) only reports itself.
    required: bool = True
    timeout_s: float = 2.0
    ok: bool | None = None
    last_error: str = ""


class HealthReporter:
    """Runs component checks on a timer and publishes them through grpc.health.v1.

    Status names: "" and each gRPC service name report the service as a whole; each component is
    reported under its own name (for example "database"), so `grpc_health_probe -service=cache`
    tells whether the cache is up.
    """

    def __init__(self, service_names: list[str], interval_s: float = 2.0) -> None:
        self.servicer = HealthServicer()
        self.service_names = ["", *service_names]
        self.interval_s = interval_s
        self.components: dict[str, Component] = {}
        self._task: asyncio.Task[None] | None = None

    def add_component(self, name: str, check: HealthCheck, *, required: bool = True, timeout_s: float = 2.0) -> None:
        self.components[name] = Component(name, check, required, timeout_s)

    @property
    def serving(self) -> bool:
        return all(c.ok for c in self.components.values() if c.required)

    async def refresh(self) -> bool:
        """Run every check once, publish the results, and return whether the service is serving."""
        await asyncio.gather(*(self._check(c) for c in self.components.values()))
        overall = SERVING if self.serving else NOT_SERVING
        for name in self.service_names:
            await self.servicer.set(name, overall)
        return overall == SERVING

    async def _check(self, component: Component) -> None:
        try:
            await asyncio.wait_for(component.check(), component.timeout_s)
            ok, error = True, ""
        except Exception as exc:  # any failure of a check means the component is down
            ok, error = False, f"{type(exc).__name__}: {exc}"
        if ok != component.ok:
            level = logging.INFO if ok else logging.WARNING
            log.log(
                level,
                "component %s is %s",
                component.name,
                "up" if ok else "down",
                extra={"component": component.name, "error": error},
            )
        component.ok, component.last_error = ok, error
        COMPONENT_UP.labels(component.name).set(1 if ok else 0)
        await self.servicer.set(component.name, SERVING if ok else NOT_SERVING)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="health-checks")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()

    async def enter_graceful_shutdown(self) -> None:
        """Report NOT_SERVING everywhere, for good: balancers stop sending new calls."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.servicer.enter_graceful_shutdown()
