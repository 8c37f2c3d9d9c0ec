"""Shadow comparison: Envoy mirrors sampled requests here, and off the caller's path the differences are recorded.

What was chosen, and why. Envoy's `request_mirror_policies` sends the sampled fraction of a model's
requests to the router (static cluster `xds`; Envoy appends `-shadow` to the mirror's :authority and
the mirror policy adds `x-servegrid-mirror`). Envoy discards whatever a mirror answers, and never
hands the primary's response to anyone but the caller, so a comparison needs the primary's answer a
second time: the router answers the mirror at once with an empty OK (Envoy is not held) and then,
bounded by `shadow_max_in_flight` (past it a mirror is dropped and counted, never queued), sends the
request through Envoy's mesh listener twice: to the shadow version (explicit version header) and to
the primary version. That costs one extra inference per sampled request, on the primary's backends,
off the caller's path; the caller's latency does not move. The primary is the version the caller got
when Envoy named it (`x-servegrid-model-version` on the mirror: an explicit version, or the one a
weighted cluster adds) or when the route is sticky (the sticky header is passed on); otherwise Envoy
picks again by weight. The re-asks carry `x-servegrid-shadow-compare`, and a mirror of a re-ask is
answered and ignored, so a comparison never feeds itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from services.mesh.names import KSERVE_SERVICE, MIRROR_HEADER, MODEL_HEADER, SHADOW_COMPARE_HEADER, VERSION_HEADER
from services.router import metrics
from services.router.settings import RouterSettings
from services.router.table import CompiledRoute, RouteTable
from services.runtime.channels import open_channel
from services.runtime.errors import FailedPrecondition, abort_with
from services.runtime.tracing import carried_metadata

log = logging.getLogger(__name__)

MODEL_INFER = f"/{KSERVE_SERVICE}/ModelInfer"
# MIRROR_HEADER is added by Envoy's mirror policy: only mirrors are answered here. SHADOW_COMPARE_HEADER
# marks the router's own re-asks: their mirrors are ignored, so a comparison never feeds itself.

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
    """What the shadow comparisons of one model found since the router started (also exported as metrics)."""

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


class ShadowComparator:
    """Answers Envoy's mirrors at once and compares each, in the background, against the primary."""

    def __init__(self, table: RouteTable, settings: RouterSettings, channel: grpc.aio.Channel | None = None) -> None:
        self.table = table
        self.mesh_address = settings.mesh_address
        self.max_in_flight = settings.shadow_max_in_flight
        self.timeout_s = settings.shadow_timeout_s
        self.max_message_bytes = settings.max_message_bytes
        self.tls = settings.tls
        self.in_flight = 0
        self.stats: dict[str, ShadowStats] = {}
        self._channel = channel
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned_no_mesh = False

    # ---- the mirror endpoint ----------------------------------------------------------------------

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        metadata = _metadata(context)
        if MIRROR_HEADER not in metadata:
            # Passthrough method (no interceptor): abort with the status and its ErrorInfo here.
            error = FailedPrecondition(
                "the router serves no inference: send KServe v2 calls to Envoy (only mirrored copies come here)",
                reason="NOT_A_MIRROR",
            )
            await abort_with(context, error.to_grpc_status())
        if SHADOW_COMPARE_HEADER not in metadata:
            self.submit(metadata, request)
        return b""  # an empty ModelInferResponse: Envoy discards a mirror's answer anyway

    def handler(self) -> grpc.GenericRpcHandler:
        """ModelInfer only, raw bytes in and out (the mirror is parsed only if it is compared)."""
        return grpc.method_handlers_generic_handler(
            KSERVE_SERVICE, {"ModelInfer": grpc.unary_unary_rpc_method_handler(self.model_infer)}
        )

    def submit(self, metadata: Mapping[str, str], request: bytes) -> None:
        """Start comparing one mirrored request, unless too many comparisons are in flight."""
        route = self.table.routes.get(metadata.get(MODEL_HEADER, ""))
        if route is None or route.shadow is None:
            return  # the policy changed since Envoy mirrored it
        labels = (route.model_id, route.shadow.version_str)
        stats = self.stats.setdefault(route.model_id, ShadowStats())
        if self.in_flight >= self.max_in_flight or not self.mesh_address:
            if not self.mesh_address and not self._warned_no_mesh:
                self._warned_no_mesh = True
                log.warning("shadow mirrors arrive but mesh_address is not set: they are dropped uncompared")
            stats.dropped += 1
            metrics.SHADOW_REQUESTS.labels(*labels, "dropped").inc()
            return
        self.in_flight += 1
        stats.sent += 1
        metrics.SHADOW_REQUESTS.labels(*labels, "sent").inc()
        task = asyncio.get_running_loop().create_task(self._compare(route, metadata, request, stats))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- the comparison, off the caller's path ----------------------------------------------------

    async def _compare(
        self, route: CompiledRoute, metadata: Mapping[str, str], request: bytes, stats: ShadowStats
    ) -> None:
        assert route.shadow is not None
        labels = (route.model_id, route.shadow.version_str)
        try:
            message = service_pb2.ModelInferRequest.FromString(request)
            primary_version = metadata.get(VERSION_HEADER) or message.model_version
            sticky = (route.sticky_header, metadata[route.sticky_header]) if route.sticky_header in metadata else None
            # The caller's request id and trace context go along: the re-asks show in its trace and logs.
            carried = carried_metadata(metadata.items())
            primary, shadow = await asyncio.gather(
                self._ask(route.model_id, primary_version, message, sticky, carried),
                self._ask(route.model_id, route.shadow.version_str, message, sticky, carried),
            )
            diff = compare(primary, shadow)
        except Exception as error:  # a shadow failure is recorded, never surfaced
            stats.errors += 1
            metrics.SHADOW_REQUESTS.labels(*labels, "error").inc()
            log.debug("shadow comparison for %s failed: %s", route.model_id, error)
            return
        finally:
            self.in_flight -= 1
        stats.compared += 1
        stats.max_abs_diff = max(stats.max_abs_diff, diff.max_abs_diff)
        stats.argmax_mismatches += diff.argmax_mismatches
        stats.shape_mismatches += diff.shape_mismatches
        metrics.SHADOW_REQUESTS.labels(*labels, "compared").inc()
        metrics.SHADOW_MAX_ABS_DIFF.labels(*labels).observe(diff.max_abs_diff)
        # Counted even at 0: a shadow that agrees shows 0 disagreements, not no data.
        metrics.SHADOW_ARGMAX_MISMATCHES.labels(*labels).inc(diff.argmax_mismatches)

    async def _ask(
        self,
        model_id: str,
        version: str,
        message: service_pb2.ModelInferRequest,
        sticky: tuple[str, str] | None,
        carried: list[tuple[str, str]],
    ) -> service_pb2.ModelInferResponse:
        """One ModelInfer through the mesh. The version goes in the header only: the body names the model
        (as the header does; Envoy's Lua refuses a disagreement) and no version, so the Triton version the
        cluster maps to is the one that runs."""
        outgoing = service_pb2.ModelInferRequest()
        outgoing.CopyFrom(message)
        outgoing.model_name = model_id
        outgoing.ClearField("model_version")
        headers = [(MODEL_HEADER, model_id), (SHADOW_COMPARE_HEADER, "1"), *carried]
        if version:
            headers.append((VERSION_HEADER, version))
        elif sticky is not None:
            headers.append(sticky)
        call = self._mesh().unary_unary(
            MODEL_INFER,
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        response: service_pb2.ModelInferResponse = await call(outgoing, timeout=self.timeout_s, metadata=headers)
        return response

    def _mesh(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = open_channel(
                self.mesh_address,
                tls=self.tls,
                peer="envoy",
                options=[
                    ("grpc.max_send_message_length", self.max_message_bytes),
                    ("grpc.max_receive_message_length", self.max_message_bytes),
                ],
            )
        return self._channel

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        out[key] = value if isinstance(value, str) else value.decode(errors="replace")
    return out
