"""Loads and unloads models on Triton backends through the repository API (tritonclient.grpc.aio)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from services.registry.domain import Backend
from services.registry.metrics import BACKEND_LOADS
from services.runtime.errors import FailedPrecondition, ServegridError, Unavailable

log = logging.getLogger(__name__)

# Triton status codes that mean "could not reach or ask the backend", as opposed to "it refused".
_TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED")


@dataclass(frozen=True)
class LoadFailure:
    """Why one backend did not load a model."""

    backend_id: str
    address: str
    reason: str
    transient: bool


class ModelLoader(Protocol):
    """What the registry needs from a backend's model repository API; tests may pass a fake."""

    async def is_ready(self, backend: Backend, triton_model_name: str) -> bool: ...

    async def load(self, backend: Backend, triton_model_name: str) -> None: ...

    async def unload(self, backend: Backend, triton_model_name: str) -> None: ...


class TritonModelLoader:
    """The real ModelLoader: one short-lived gRPC client per call (promotions are rare)."""

    def __init__(self, *, load_timeout_s: float = 120.0, probe_timeout_s: float = 5.0) -> None:
        self.load_timeout_s = load_timeout_s
        self.probe_timeout_s = probe_timeout_s

    async def is_ready(self, backend: Backend, triton_model_name: str) -> bool:
        client = InferenceServerClient(backend.address)
        try:
            return bool(await client.is_model_ready(triton_model_name, client_timeout=self.probe_timeout_s))
        finally:
            await client.close()

    async def load(self, backend: Backend, triton_model_name: str) -> None:
        client = InferenceServerClient(backend.address)
        try:
            await client.load_model(triton_model_name, client_timeout=self.load_timeout_s)
        finally:
            await client.close()

    async def unload(self, backend: Backend, triton_model_name: str) -> None:
        client = InferenceServerClient(backend.address)
        try:
            await client.unload_model(triton_model_name, client_timeout=self.load_timeout_s)
        finally:
            await client.close()


def _describe(exc: BaseException) -> tuple[str, bool]:
    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        transient = any(code in status for code in _TRANSIENT)
        return f"{status or 'error'}: {exc.message()}", transient
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out", True
    return f"{type(exc).__name__}: {exc}", isinstance(exc, OSError)


class BackendModelControl:
    """Loads a Triton model on every backend that serves it, all or nothing, and unloads retired ones."""

    def __init__(self, loader: ModelLoader) -> None:
        self.loader = loader

    async def load_everywhere(self, triton_model_name: str, backends: Sequence[Backend], *, what: str) -> None:
        """Load on each backend; if any fails, undo the loads this call made and raise naming the backend."""
        targets = [b for b in backends if b.serves(triton_model_name)]
        if not targets:
            raise FailedPrecondition(
                f"no registered backend can serve Triton model {triton_model_name!r} for {what}",
                reason="BACKEND_LOAD_FAILED",
                metadata={"triton_model_name": triton_model_name},
            )
        results = await asyncio.gather(*(self._load_one(b, triton_model_name) for b in targets))
        failures = [r for r in results if isinstance(r, LoadFailure)]
        if not failures:
            return
        # Leave backends as we found them: a model that was not loaded before this call is unloaded
        # again, so a refused promotion leaks no memory. One that was already serving stays.
        fresh = [b for b, r in zip(targets, results, strict=True) if r is False]
        await asyncio.gather(*(self._unload_quietly(b, triton_model_name) for b in fresh))
        first = failures[0]
        detail = "; ".join(f"backend {f.backend_id} ({f.address}): {f.reason}" for f in failures)
        error_type: type[ServegridError] = Unavailable if all(f.transient for f in failures) else FailedPrecondition
        raise error_type(
            f"loading Triton model {triton_model_name!r} for {what} failed; the stage is unchanged. {detail}",
            reason="BACKEND_LOAD_FAILED",
            metadata={
                "backend_id": first.backend_id,
                "address": first.address,
                "triton_model_name": triton_model_name,
                "failed_backends": ",".join(f.backend_id for f in failures),
            },
        )

    async def _load_one(self, backend: Backend, name: str) -> LoadFailure | bool:
        """True/False: loaded, and whether it was ready before; a LoadFailure otherwise."""
        try:
            try:
                was_ready = await self.loader.is_ready(backend, name)
            except InferenceServerException:
                was_ready = False  # Triton answers an unknown model with an error rather than False
            await self.loader.load(backend, name)
        except Exception as exc:
            reason, transient = _describe(exc)
            BACKEND_LOADS.labels("load", "error").inc()
            log.warning(
                "backend refused a model load",
                extra={"backend_id": backend.backend_id, "triton_model_name": name, "error": reason},
            )
            return LoadFailure(backend.backend_id, backend.address, reason, transient)
        BACKEND_LOADS.labels("load", "ok").inc()
        log.info("model loaded on backend", extra={"backend_id": backend.backend_id, "triton_model_name": name})
        return was_ready

    async def unload_everywhere(self, triton_model_name: str, backends: Sequence[Backend]) -> None:
        """Best effort: the version is already out of every route, so a failed unload only costs memory."""
        await asyncio.gather(
            *(self._unload_quietly(b, triton_model_name) for b in backends if b.serves(triton_model_name))
        )

    async def _unload_quietly(self, backend: Backend, name: str) -> None:
        try:
            await self.loader.unload(backend, name)
        except Exception as exc:
            reason, _ = _describe(exc)
            BACKEND_LOADS.labels("unload", "error").inc()
            log.warning(
                "backend did not unload a model",
                extra={"backend_id": backend.backend_id, "triton_model_name": name, "error": reason},
            )
            return
        BACKEND_LOADS.labels("unload", "ok").inc()
        log.info("model unloaded from backend", extra={"backend_id": backend.backend_id, "triton_model_name": name})
