"""Backends: one persistent channel each, with active probes, passive ejection, a breaker and a latency EWMA."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.router import metrics
from services.router.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from services.router.settings import RouterSettings
from services.runtime.tracing import client_interceptors

log = logging.getLogger(__name__)

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
UNSPECIFIED, HEALTHY, UNHEALTHY = 0, 1, 2  # values of servegrid.router.v1.BackendHealth

# Failures that say something about the backend (not about the caller's request).
BACKEND_FAULTS = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DATA_LOSS,
    }
)


def channel_options(settings: RouterSettings) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # gRPC's default reconnect backoff grows to minutes; a restarted Triton must be found in
        # about a second, and the probes tell us when it is worth trying.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        # One connection per backend address even if two Backend objects name it.
        ("grpc.use_local_subchannel_pool", 1),
    ]


class Backend:
    """One Triton (or any KServe v2 server) as the router tracks it."""

    def __init__(self, backend_id: str, address: str, weight: int, settings: RouterSettings) -> None:
        self.backend_id = backend_id
        self.address = address
        self.weight = weight
        self.models: set[tuple[str, str]] = set()
        self._tau = settings.ewma_decay_s
        self._eject_threshold = settings.eject_consecutive_failures
        self._eject_base = settings.eject_base_s
        self._eject_max = settings.eject_max_s
        self.channel = grpc.aio.insecure_channel(
            address, options=channel_options(settings), interceptors=client_interceptors() or None
        )
        # Raw bytes both ways: the router never decodes tensors on the hot path.
        self.infer = self.channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.in_flight = 0
        self.cost_s = 0.0  # peak-EWMA latency
        self.cost_at = 0.0
        self.health = UNSPECIFIED
        self.model_ready: dict[tuple[str, str], bool] = {}
        self.drained = False
        self.ejected_until = 0.0
        self.ejections = 0
        self.consecutive_unavailable = 0
        self.requests_total = 0
        self.failures_total = 0
        self.breaker = CircuitBreaker(
            backend_id,
            BreakerPolicy(
                consecutive_failures=settings.breaker_consecutive_failures,
                error_rate=settings.breaker_error_rate,
                window=settings.breaker_window,
                min_requests=settings.breaker_min_requests,
                open_s=settings.breaker_open_s,
                half_open_trials=settings.breaker_half_open_trials,
            ),
            on_transition=_breaker_moved,
        )
        metrics.BREAKER_STATE.labels(backend_id).set(BreakerState.CLOSED)

    def eligible(self, key: tuple[str, str], now: float) -> bool:
        """May a request for Triton model `key` go here now?"""
        return (
            not self.drained
            and self.health != UNHEALTHY
            and now >= self.ejected_until
            and self.model_ready.get(key, True)
            and self.breaker.allows()
        )

    def score(self, now: float) -> float:
        """P2C cost: latency estimate x (requests in flight + 1). An idle backend's estimate decays,
        so a backend that was slow once gets tried again instead of being starved forever."""
        cost = self.cost_s * math.exp((self.cost_at - now) / self._tau) if self.cost_s else 0.0
        return (cost + 1e-5) * (self.in_flight + 1)

    def observe(self, rtt_s: float, now: float) -> None:
        if rtt_s > self.cost_s:
            self.cost_s = rtt_s  # peak: react to a slowdown at once
        else:
            w = math.exp((self.cost_at - now) / self._tau)
            self.cost_s = self.cost_s * w + rtt_s * (1.0 - w)
        self.cost_at = now

    def on_success(self, rtt_s: float, now: float) -> None:
        self.requests_total += 1
        self.observe(rtt_s, now)
        self.consecutive_unavailable = 0
        self.breaker.record(True)

    def on_failure(self, code: grpc.StatusCode, now: float) -> None:
        """Count a failed call; only faults of the backend feed the breaker and ejection."""
        self.requests_total += 1
        if code not in BACKEND_FAULTS:
            # The backend answered (a bad shape, say): it is alive and did the work.
            self.consecutive_unavailable = 0
            self.breaker.record(True)
            return
        self.failures_total += 1
        self.breaker.record(False)
        if code is grpc.StatusCode.UNAVAILABLE:
            self.consecutive_unavailable += 1
            if self.consecutive_unavailable >= self._eject_threshold and now >= self.ejected_until:
                self.eject(now)

    def eject(self, now: float) -> None:
        cool_down = min(self._eject_max, self._eject_base * (2**self.ejections))
        self.ejections += 1
        self.ejected_until = now + cool_down
        self.consecutive_unavailable = 0
        metrics.EJECTIONS.labels(self.backend_id).inc()
        log.warning(
            "backend %s ejected for %.1fs after consecutive connection failures",
            self.backend_id,
            cool_down,
            extra={"backend_id": self.backend_id, "cool_down_s": cool_down},
        )

    def set_health(self, health: int) -> None:
        if health != self.health:
            log.log(
                logging.INFO if health == HEALTHY else logging.WARNING,
                "backend %s is %s",
                self.backend_id,
                "healthy" if health == HEALTHY else "unhealthy",
                extra={"backend_id": self.backend_id, "address": self.address},
            )
            metrics.BACKEND_HEALTHY.labels(self.backend_id).set(1 if health == HEALTHY else 0)
        if health == HEALTHY and self.health == UNHEALTHY:
            # Back after an outage: end the ejection and forget its backoff, the probes vouch for it.
            self.ejected_until = 0.0
            self.ejections = 0
            self.consecutive_unavailable = 0
        self.health = health

    async def probe(self, timeout_s: float) -> None:
        """ServerReady, then ModelReady for every Triton model the table sends here."""
        try:
            reply = await self.stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout_s)
            ready = reply.ready
        except grpc.aio.AioRpcError:
            ready = False
        if not ready:
            self.set_health(UNHEALTHY)
            return
        models = sorted(self.models)
        results = await asyncio.gather(
            *(
                self.stub.ModelReady(service_pb2.ModelReadyRequest(name=name, version=version), timeout=timeout_s)
                for name, version in models
            ),
            return_exceptions=True,
        )
        for key, result in zip(models, results, strict=True):
            if isinstance(result, service_pb2.ModelReadyResponse):
                self.model_ready[key] = result.ready
            elif isinstance(result, grpc.aio.AioRpcError):
                self.model_ready[key] = False
        self.set_health(HEALTHY)

    async def close(self) -> None:
        await self.channel.close(grace=None)


def _breaker_moved(backend_id: str, old: BreakerState, new: BreakerState) -> None:
    metrics.BREAKER_STATE.labels(backend_id).set(new)
    metrics.BREAKER_TRANSITIONS.labels(backend_id, new.name.lower()).inc()


class BackendPool:
    """Every backend the routing table names, kept in step with the table, probed on a timer."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.backends: dict[str, Backend] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def sync(self, wanted: Mapping[str, tuple[str, int, set[tuple[str, str]]]]) -> None:
        """Match the table: open channels for new backends, replace moved ones, close removed ones."""
        for backend_id, (address, weight, models) in wanted.items():
            backend = self.backends.get(backend_id)
            if backend is None or backend.address != address:
                if backend is not None:
                    self._close_later(backend)
                backend = Backend(backend_id, address, 1, self.settings)
                self.backends[backend_id] = backend
                log.info("backend %s added at %s", backend_id, address, extra={"backend_id": backend_id})
            backend.models = set(models)
            backend.weight = weight
        for backend_id in [b for b in self.backends if b not in wanted]:
            self._close_later(self.backends.pop(backend_id))
            log.info("backend %s removed", backend_id, extra={"backend_id": backend_id})

    def _close_later(self, backend: Backend) -> None:
        # Requests in flight on the old channel finish within the grace period.
        async def close() -> None:
            await asyncio.sleep(self.settings.grace_period_s)
            await backend.close()

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def candidates(self, backend_ids: Iterable[str], key: tuple[str, str], now: float) -> list[Backend]:
        backends = self.backends
        out = []
        for backend_id in backend_ids:
            backend = backends.get(backend_id)
            if backend is not None and backend.eligible(key, now):
                out.append(backend)
        return out

    def get(self, backend_id: str) -> Backend | None:
        return self.backends.get(backend_id)

    async def probe_all(self) -> None:
        await asyncio.gather(*(b.probe(self.settings.probe_timeout_s) for b in list(self.backends.values())))

    async def _probe_loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.probe_all()
            except Exception:  # a probe bug must not stop probing
                log.exception("backend probes failed")
            await asyncio.sleep(max(0.0, self.settings.probe_interval_s - (time.monotonic() - started)))

    async def start(self) -> None:
        await self.probe_all()
        self._task = asyncio.get_running_loop().create_task(self._probe_loop(), name="backend-probes")

    async def check(self) -> None:
        """Health component: fine with no backends yet (waiting for routes), else one must be healthy."""
        if self.backends and not any(b.health == HEALTHY for b in self.backends.values()):
            raise RuntimeError("no backend passes its probes")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*(b.close() for b in self.backends.values()), return_exceptions=True)
        self.backends.clear()
