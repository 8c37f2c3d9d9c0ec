"""Backend readiness probes: ServerReady + ModelReady per backend, plus operator drains, as endpoint states for EDS."""

# The router carries no inference any more; what it knows about a backend is what it tells Envoy.
# Every probe_interval_s each backend the table names gets ServerReady, then ModelReady for every
# (Triton model, version) the table sends it. The verdicts and the drain flags become one
# EndpointStates mapping, (backend, Triton model, Triton version) -> HEALTHY / UNHEALTHY / DRAINING,
# which services.mesh turns into EDS health. Listeners hear only of real changes, so idle probing
# never rebuilds a snapshot. A backend whose connection drops (Triton exited, restarted) is probed at
# once rather than at the next tick, so the interval only bounds what no connection shows: a model
# unloaded on a live Triton.

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.router import metrics
from services.router.settings import RouterSettings
from services.router.table import BackendSpec
from services.runtime.channels import open_channel

log = logging.getLogger(__name__)

# Values of servegrid.router.v1.BackendHealth.
UNSPECIFIED, HEALTHY, UNHEALTHY = 0, 1, 2


class EndpointState(enum.IntEnum):
    """What Envoy is told about one backend for one Triton model.

    The numbers are both Envoy's `config.core.v3.HealthStatus` and `servegrid.router.v1.EndpointState`.
    """

    HEALTHY = 1
    UNHEALTHY = 2  # probes fail, the model is not ready there, or it was never probed
    DRAINING = 3  # an operator drained the backend: no new requests, those in flight finish


EndpointKey = tuple[str, str, str]  # (backend_id, triton_model_name, triton_model_version)
EndpointStates = Mapping[EndpointKey, EndpointState]
ModelKey = tuple[str, str]  # (triton_model_name, triton_model_version); "" = Triton's latest


class ProbeClient(Protocol):
    """The two KServe v2 readiness calls a probe makes; production speaks gRPC, tests fake it."""

    async def server_ready(self, timeout_s: float) -> bool: ...

    async def model_ready(self, name: str, version: str, timeout_s: float) -> bool: ...

    async def connection_lost(self) -> None:
        """Return when the connection to the backend, once up, goes down."""
        ...

    async def close(self) -> None: ...


def channel_options(settings: RouterSettings) -> list[tuple[str, Any]]:
    return [
        # gRPC's default reconnect backoff grows to minutes; a restarted Triton must be found in
        # about a second.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        # One connection per backend address even if two backend ids name it.
        ("grpc.use_local_subchannel_pool", 1),
    ]


class TritonProbeClient:
    """ServerReady/ModelReady over one gRPC channel to a backend."""

    def __init__(self, address: str, settings: RouterSettings) -> None:
        # Triton speaks plaintext gRPC (it takes no client certificates): no `tls` here.
        self.channel = open_channel(address, options=channel_options(settings))
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    async def server_ready(self, timeout_s: float) -> bool:
        try:
            reply = await self.stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.ready)

    async def model_ready(self, name: str, version: str, timeout_s: float) -> bool:
        try:
            reply = await self.stub.ModelReady(
                service_pb2.ModelReadyRequest(name=name, version=version), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.ready)

    async def connection_lost(self) -> None:
        ready = grpc.ChannelConnectivity.READY
        state = self.channel.get_state()
        while True:
            await self.channel.wait_for_state_change(state)
            was, state = state, self.channel.get_state()
            if was is ready and state is not ready:
                return

    async def close(self) -> None:
        await self.channel.close(grace=None)


ProbeClientFactory = Callable[[str], ProbeClient]


def address_host(address: str) -> str:
    """The host of "host:port" ("[v6]:port" too)."""
    return address.rpartition(":")[0].strip("[]")


async def resolve_host(host: str) -> str | None:
    """An IP literal for `host` (itself when it is one), or None when it does not resolve now.

    EDS endpoints are addresses, not names, while a Kubernetes StatefulSet's Tritons register by DNS
    name; resolving here, on the probe's own schedule, follows a pod that moves.
    """
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return None
    return str(infos[0][4][0]) if infos else None


class ProbedBackend:
    """One Triton as the probes see it: server readiness, per-model readiness, the operator's drain flag
    (the registry's, shared by every replica; or this replica's own, on a static routes file)."""

    def __init__(self, backend_id: str, spec: BackendSpec, client: ProbeClient) -> None:
        self.backend_id = backend_id
        self.spec = spec
        self.client = client
        self.health = UNSPECIFIED
        self.model_ready: dict[ModelKey, bool] = {}  # only models probed at least once
        self.replica_drained = False  # drained on this replica only (a router without a registry)
        self.probed_at = 0.0
        self.resolved: dict[str, str | None] = {}  # host of the gRPC / HTTP address -> IP, at the last probe
        self.watch: asyncio.Task[None] | None = None  # BackendProbes' wait for its connection to drop

    @property
    def models(self) -> frozenset[ModelKey]:
        return self.spec.models

    @property
    def drained(self) -> bool:
        return self.spec.drained or self.replica_drained

    def state(self, model: ModelKey) -> EndpointState:
        if self.drained:
            return EndpointState.DRAINING
        if self.health == HEALTHY and self.model_ready.get(model, False):
            return EndpointState.HEALTHY
        return EndpointState.UNHEALTHY

    def unready_models(self) -> list[ModelKey]:
        """Models the table sends here that are not known to be ready (all of them while the server is down)."""
        if self.health != HEALTHY:
            return sorted(self.models)
        return sorted(m for m in self.models if not self.model_ready.get(m, False))

    def unprobed(self) -> bool:
        return self.health == UNSPECIFIED or any(m not in self.model_ready for m in self.models)

    async def resolve(self) -> None:
        hosts = {address_host(a) for a in (self.spec.address, self.spec.http_address) if a}
        found = await asyncio.gather(*(resolve_host(h) for h in sorted(hosts)))
        self.resolved = dict(zip(sorted(hosts), found, strict=True))

    async def probe(self, timeout_s: float, only_unprobed: bool = False) -> None:
        """ServerReady, then ModelReady for every Triton model the table sends here (concurrently)."""
        models = sorted(m for m in self.models if not only_unprobed or m not in self.model_ready)
        await self.resolve()
        ready = await self.client.server_ready(timeout_s)
        if not ready:
            self._set_health(UNHEALTHY)
            self.model_ready.update(dict.fromkeys(models, False))
            return
        results = await asyncio.gather(*(self.client.model_ready(n, v, timeout_s) for n, v in models))
        self.model_ready.update(zip(models, results, strict=True))
        self._set_health(HEALTHY)
        self.probed_at = time.time()

    def _set_health(self, health: int) -> None:
        if health == self.health:
            return
        log.log(
            logging.INFO if health == HEALTHY else logging.WARNING,
            "backend %s is %s",
            self.backend_id,
            "ready" if health == HEALTHY else "not ready",
            extra={"backend_id": self.backend_id, "address": self.spec.address},
        )
        self.health = health
        self.export_state()

    def export_state(self) -> None:
        """servegrid_router_backend_state: draining over the probes' verdict (what Envoy is told)."""
        if self.drained:
            metrics.set_backend_state(self.backend_id, "draining")
        elif self.health != UNSPECIFIED:
            metrics.set_backend_state(self.backend_id, "healthy" if self.health == HEALTHY else "unhealthy")


class BackendProbes:
    """Every backend the routing table names, kept in step with it, probed on a timer.

    `states()` is what Envoy should be told; listeners registered with `on_change` run (synchronously)
    only when it changes: a probe verdict flipped, a drain, or the table added or removed a key.
    """

    def __init__(self, settings: RouterSettings, client_factory: ProbeClientFactory | None = None) -> None:
        self.settings = settings
        self.backends: dict[str, ProbedBackend] = {}
        self._client_factory = client_factory or (lambda address: TritonProbeClient(address, settings))
        self._listeners: list[Callable[[], None]] = []
        self._states: dict[EndpointKey, EndpointState] = {}
        self._resolved: dict[str, str | None] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._connection_lost = asyncio.Event()  # cuts the probe loop's wait short

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def states(self) -> EndpointStates:
        """(backend, Triton model, Triton version) -> state, for every pair the table names. Do not mutate."""
        return self._states

    def sync(self, wanted: Mapping[str, BackendSpec]) -> None:
        """Follow the table: probe new backends, re-address moved ones, forget removed ones (a replica's own
        drain flag stays with a backend whose address changes, and goes with one the table drops; the
        registry's comes with the spec)."""
        for backend_id, spec in wanted.items():
            backend = self.backends.get(backend_id)
            if backend is None or backend.spec.address != spec.address:
                replacement = ProbedBackend(backend_id, spec, self._client_factory(spec.address))
                if backend is not None:
                    replacement.replica_drained = backend.replica_drained
                    self._close_later(backend)
                self.backends[backend_id] = replacement
                log.info("backend %s probed at %s", backend_id, spec.address, extra={"backend_id": backend_id})
            else:
                if backend.spec.drained != spec.drained:
                    log.warning(
                        "backend %s %s in the registry",
                        backend_id,
                        "drained" if spec.drained else "undrained",
                        extra={"backend_id": backend_id},
                    )
                backend.spec = spec
                backend.export_state()  # the registry's drain flag may have changed
                backend.model_ready = {m: r for m, r in backend.model_ready.items() if m in spec.models}
        for backend_id in [b for b in self.backends if b not in wanted]:
            self._close_later(self.backends.pop(backend_id))
            metrics.forget_backend(backend_id)
            log.info("backend %s removed", backend_id, extra={"backend_id": backend_id})
        self._recompute()

    def get(self, backend_id: str) -> ProbedBackend | None:
        return self.backends.get(backend_id)

    def resolve(self, host: str) -> str | None:
        """The IP the last probe found for a backend host (services.mesh.resources' `resolve`)."""
        return self._resolved.get(host)

    def set_drained(self, backend_id: str, drained: bool) -> ProbedBackend | None:
        """Drain or undrain on this replica only (a router on a static table, with no registry to share
        the flag through); None when the table names no such backend."""
        backend = self.backends.get(backend_id)
        if backend is None:
            return None
        if backend.replica_drained != drained:
            backend.replica_drained = drained
            backend.export_state()
            log.warning(
                "backend %s %s by an operator",
                backend_id,
                "drained" if drained else "undrained",
                extra={"backend_id": backend_id},
            )
        self._recompute()
        return backend

    def has_unprobed(self) -> bool:
        return any(b.unprobed() for b in self.backends.values())

    async def probe_unprobed(self) -> None:
        """Probe only what was never probed (a backend or model the table just added), so a snapshot built
        right after a table change tells Envoy the truth about new endpoints instead of guessing."""
        timeout = self.settings.probe_timeout_s
        await asyncio.gather(
            *(b.probe(timeout, only_unprobed=True) for b in list(self.backends.values()) if b.unprobed())
        )
        self._recompute()

    async def probe_all(self) -> None:
        timeout = self.settings.probe_timeout_s
        for backend in self.backends.values():
            self._watch(backend)
        await asyncio.gather(*(b.probe(timeout) for b in list(self.backends.values())))
        self._recompute()

    def _watch(self, backend: ProbedBackend) -> None:
        """Make the probe loop look at once when `backend`'s connection drops (started once per backend)."""
        if backend.watch is not None:
            return

        async def watch() -> None:
            while True:
                await backend.client.connection_lost()
                log.info("backend %s lost its connection; probing now", backend.backend_id)
                self._connection_lost.set()

        backend.watch = asyncio.get_running_loop().create_task(watch(), name=f"probe-watch-{backend.backend_id}")

    def _recompute(self) -> None:
        states = {
            (backend_id, name, version): backend.state((name, version))
            for backend_id, backend in self.backends.items()
            for name, version in backend.models
        }
        resolved = {h: ip for b in self.backends.values() for h, ip in b.resolved.items()}
        if states == self._states and resolved == self._resolved:
            return
        self._states = states
        self._resolved = resolved
        for state in EndpointState:
            metrics.ENDPOINT_STATES.labels(state.name.lower()).set(sum(1 for s in states.values() if s is state))
        for listener in self._listeners:
            listener()

    async def _probe_loop(self) -> None:
        while True:
            started = time.monotonic()
            self._connection_lost.clear()
            try:
                await self.probe_all()
            except Exception:  # a probe bug must not stop probing
                log.exception("backend probes failed")
            wait_s = max(0.0, self.settings.probe_interval_s - (time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connection_lost.wait(), wait_s)

    async def start(self) -> None:
        await self.probe_all()
        self._task = asyncio.get_running_loop().create_task(self._probe_loop(), name="backend-probes")

    async def check(self) -> None:
        """Health component: fine with no backends yet (waiting for routes), else one must be ready."""
        if self.backends and not any(b.health == HEALTHY for b in self.backends.values()):
            raise RuntimeError("no backend passes its probes")

    def _close_later(self, backend: ProbedBackend) -> None:
        # A probe of the old address may be in flight; let it finish instead of cancelling it.
        if backend.watch is not None:
            backend.watch.cancel()
        client = backend.client

        async def close() -> None:
            await asyncio.sleep(self.settings.probe_timeout_s)
            await client.close()

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in [*self._closing, *(b.watch for b in self.backends.values() if b.watch is not None)]:
            task.cancel()
        await asyncio.gather(*(b.client.close() for b in self.backends.values()), return_exceptions=True)
        self.backends.clear()
