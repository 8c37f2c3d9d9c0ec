"""Shadow traffic: copy sampled requests to another version, off the caller's path, and record the differences."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from services.router import metrics
from services.router.backends import BackendPool
from services.router.balancer import Balancer
from services.router.table import VersionTarget

log = logging.getLogger(__name__)

_NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


@dataclass
class ShadowStats:
    """What the shadow of one model did, since the router started (also exported as metrics)."""

    sent: int = 0
    dropped: int = 0
    errors: int = 0
    compared: int = 0
    max_abs_diff: float = 0.0
    argmax_mismatches: int = 0
    shape_mismatches: int = 0


@dataclass(frozen=True)
class ShadowDiff:
    max_abs_diff: float
    argmax_mismatches: int
    shape_mismatches: int


def _tensors(response: service_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    out = {}
    for index, tensor in enumerate(response.outputs):
        dtype = _NUMPY.get(tensor.datatype)
        if dtype is None or index >= len(response.raw_output_contents):
            continue  # BYTES or typed contents: not compared
        out[tensor.name] = np.frombuffer(response.raw_output_contents[index], dtype=dtype).reshape(tuple(tensor.shape))
    return out


def compare(primary: service_pb2.ModelInferResponse, shadow: service_pb2.ModelInferResponse) -> ShadowDiff:
    """Largest absolute difference over numeric outputs, and rows whose argmax (the class) differs."""
    ours, theirs = _tensors(primary), _tensors(shadow)
    max_diff = 0.0
    argmax = 0
    shapes = 0
    for name, a in ours.items():
        b = theirs.get(name)
        if b is None or a.shape != b.shape:
            shapes += 1
            continue
        if a.size == 0:
            continue
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        max_diff = max(max_diff, float(diff.max()))
        if a.ndim >= 1 and a.shape[-1] > 1:
            argmax += int(np.count_nonzero(a.argmax(axis=-1) != b.argmax(axis=-1)))
    return ShadowDiff(max_diff, argmax, shapes)


class ShadowMirror:
    """Fire-and-forget copies with a bounded number in flight: when full, copies are dropped, never queued."""

    def __init__(self, pool: BackendPool, max_in_flight: int, timeout_s: float) -> None:
        self.pool = pool
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.in_flight = 0
        self.stats: dict[str, ShadowStats] = {}
        self._balancers: dict[tuple[str, int], Balancer] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, target: VersionTarget, load_balancing: int, body: bytes | memoryview, primary: bytes) -> None:
        """Copy `body` (the backend-neutral request without its head) to `target`; compare with `primary`."""
        stats = self.stats.setdefault(target.model_id, ShadowStats())
        if self.in_flight >= self.max_in_flight:
            stats.dropped += 1
            metrics.SHADOW_REQUESTS.labels(target.model_id, target.version_str, "dropped").inc()
            return
        self.in_flight += 1
        stats.sent += 1
        metrics.SHADOW_REQUESTS.labels(target.model_id, target.version_str, "sent").inc()
        task = asyncio.get_running_loop().create_task(self._mirror(target, load_balancing, body, primary, stats))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _mirror(
        self, target: VersionTarget, load_balancing: int, body: bytes | memoryview, primary: bytes, stats: ShadowStats
    ) -> None:
        labels = (target.model_id, target.version_str)
        try:
            now = time.monotonic()
            candidates = self.pool.candidates(target.backend_ids, target.backend_key, now)
            if not candidates:
                raise LookupError("no healthy backend for the shadow version")
            balancer = self._balancers.setdefault((target.model_id, target.version), Balancer(load_balancing))
            backend = balancer.pick(candidates, now)
            backend.in_flight += 1
            started = time.perf_counter()
            try:
                answer = await backend.infer(b"".join((target.request_head, body)), timeout=self.timeout_s)
            except grpc.aio.AioRpcError as error:
                backend.on_failure(error.code(), time.monotonic())
                raise
            finally:
                backend.in_flight -= 1
            backend.on_success(time.perf_counter() - started, time.monotonic())
            diff = compare(
                service_pb2.ModelInferResponse.FromString(primary), service_pb2.ModelInferResponse.FromString(answer)
            )
        except Exception as error:  # a shadow failure is recorded, never surfaced
            stats.errors += 1
            metrics.SHADOW_REQUESTS.labels(*labels, "error").inc()
            log.debug("shadow copy failed: %s", error)
            return
        finally:
            self.in_flight -= 1
        stats.compared += 1
        stats.max_abs_diff = max(stats.max_abs_diff, diff.max_abs_diff)
        stats.argmax_mismatches += diff.argmax_mismatches
        stats.shape_mismatches += diff.shape_mismatches
        metrics.SHADOW_REQUESTS.labels(*labels, "compared").inc()
        metrics.SHADOW_MAX_ABS_DIFF.labels(*labels).observe(diff.max_abs_diff)
        if diff.argmax_mismatches:
            metrics.SHADOW_ARGMAX_MISMATCHES.labels(*labels).inc(diff.argmax_mismatches)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
