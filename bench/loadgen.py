"""Closed-loop KServe v2 gRPC load generator: requests/s, latency percentiles and errors for any target."""

# Cheap on the client side by design, because on a small box the client competes with the server for
# CPU: the request is serialized once, sent through a generic unary call with no (de)serializers, and
# the response bytes are never decoded. Any KServe v2 endpoint works: Triton, the router, Envoy.

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import numpy as np
from servegrid.common.v1 import tensor_pb2
from servegrid.gateway.v1 import gateway_pb2
from tritonclient.grpc import service_pb2

MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
GATEWAY_INFER_METHOD = "/servegrid.gateway.v1.GatewayService/Infer"
# Triton's wire names for numpy dtypes (KServe v2 datatypes).
_DATATYPES = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
}
# Room for a ResNet batch and beyond; gRPC's 4 MiB default would reject larger tensors.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


@dataclass(frozen=True)
class LoadResult:
    """What one closed-loop run measured; latencies are per request, client side, in milliseconds."""

    target: str
    model: str
    concurrency: int
    duration_s: float  # measured window (warm-up excluded)
    requests: int  # successful requests completed in the window
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    # CPU this client process used over the window, % of one core: on a shared box it is CPU the
    # server did not get, so read it next to req/s.
    client_cpu_pct: float = math.nan
    error_samples: tuple[str, ...] = field(default=())  # first few distinct error messages

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rps"] = round(self.rps, 1)
        data["error_samples"] = list(self.error_samples)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoadResult:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["error_samples"] = tuple(fields.get("error_samples", ()))
        return cls(**fields)


def encode_infer_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    *,
    version: str = "",
    outputs: Sequence[str] = (),
) -> bytes:
    """A serialized ModelInferRequest with tensors in raw_input_contents (what Triton decodes fastest)."""
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    for name, array in inputs.items():
        array = np.ascontiguousarray(array)
        request.inputs.add(name=name, datatype=_DATATYPES[array.dtype], shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request.SerializeToString()


def _percentiles(latencies_s: Sequence[float]) -> tuple[float, float, float, float]:
    if not latencies_s:
        return math.nan, math.nan, math.nan, math.nan
    ms = np.asarray(latencies_s) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return float(p50), float(p90), float(p99), float(ms.mean())


# A client certificate: (PEM private key, PEM certificate chain), for listeners that require one (the mesh).
ClientCert = tuple[bytes, bytes]


def open_channel(
    target: str, root_certificates: bytes | None = None, client_cert: ClientCert | None = None
) -> grpc.aio.Channel:
    """The load's channel: TLS verified with `root_certificates` when given (the TLS handshake and record
    costs are part of what a TLS path measures), presenting `client_cert` where the listener asks for
    one (the mesh listener under mTLS); plaintext otherwise."""
    if root_certificates is None:
        return grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
    key, chain = client_cert if client_cert is not None else (None, None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root_certificates, private_key=key, certificate_chain=chain
    )
    return grpc.aio.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)


async def run_load(
    target: str,
    model: str,
    inputs: Mapping[str, np.ndarray] | bytes,
    *,
    concurrency: int,
    duration: float,
    warmup: float = 1.0,
    version: str = "",
    request_timeout: float = 30.0,  # per-call gRPC deadline, seconds
    metadata: Sequence[tuple[str, str]] = (),
    channels: int = 1,
    connect_timeout: float = 10.0,
    root_certificates: bytes | None = None,
    client_cert: ClientCert | None = None,
) -> LoadResult:
    """Keep `concurrency` ModelInfer calls in flight against `target` (host:port) for warmup + duration.

    `inputs` is either {name: array} or an already-encoded request (see encode_infer_request). Errors
    (any non-OK status, including deadline) are counted, not raised. `channels` spreads the workers over
    several HTTP/2 connections, for targets that serialize work per connection. An unreachable target
    raises ConnectionError after `connect_timeout` seconds: that is a setup mistake, not a measurement.
    `root_certificates` (a CA's PEM) speaks TLS, as a client of a TLS public port must; None: plaintext.
    """
    payload = inputs if isinstance(inputs, bytes) else encode_infer_request(model, inputs, version=version)
    opened = [open_channel(target, root_certificates, client_cert) for _ in range(max(1, channels))]
    try:
        try:
            await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in opened)), connect_timeout)
        except TimeoutError:
            raise ConnectionError(f"no gRPC connection to {target} within {connect_timeout:.0f}s") from None
        calls = [
            channel.unary_unary(MODEL_INFER_METHOD, request_serializer=None, response_deserializer=None)
            for channel in opened
        ]
        loop_clock = time.perf_counter
        measure_from = loop_clock() + warmup
        stop_at = measure_from + duration
        latencies: list[float] = []
        errors = 0
        error_samples: list[str] = []
        last_done = measure_from
        call_metadata = tuple(metadata) or None

        async def worker(call: Any) -> None:
            nonlocal errors, last_done
            while True:
                started = loop_clock()
                if started >= stop_at:
                    return
                try:
                    await call(payload, timeout=request_timeout, metadata=call_metadata)
                    ok = True
                except grpc.aio.AioRpcError as error:
                    ok = False
                    message = f"{error.code().name}: {error.details()}"
                finished = loop_clock()
                if started < measure_from:
                    continue  # warm-up: connections, caches and the server's first batches settle
                last_done = max(last_done, finished)
                if ok:
                    latencies.append(finished - started)
                else:
                    errors += 1
                    if len(error_samples) < 5 and message not in error_samples:
                        error_samples.append(message)

        cpu_at_start = 0.0

        async def mark_window_start() -> None:
            nonlocal cpu_at_start
            await asyncio.sleep(max(0.0, measure_from - loop_clock()))
            cpu_at_start = time.process_time()

        await asyncio.gather(mark_window_start(), *(worker(calls[i % len(calls)]) for i in range(concurrency)))
        cpu_used = time.process_time() - cpu_at_start
    finally:
        await asyncio.gather(*(channel.close() for channel in opened))

    # Requests started before the deadline finish after it; count the window up to the last of them.
    window = max(stop_at, last_done) - measure_from
    p50, p90, p99, mean = _percentiles(latencies)
    return LoadResult(
        target=target,
        model=model,
        concurrency=concurrency,
        duration_s=window,
        requests=len(latencies),
        errors=errors,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        mean_ms=mean,
        client_cpu_pct=100.0 * cpu_used / window if window > 0 else math.nan,
        error_samples=tuple(error_samples),
    )


def run_load_sync(*args: Any, **kwargs: Any) -> LoadResult:
    """run_load on a fresh event loop (uvloop when installed: a few percent less client CPU)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a project dependency
        return asyncio.run(run_load(*args, **kwargs))
    return uvloop.run(run_load(*args, **kwargs))


def gateway_request(model: str, inputs: Mapping[str, np.ndarray]) -> bytes:
    """A serialized servegrid InferRequest with the same tensors as the direct KServe request."""
    tensors = []
    for name, array in inputs.items():
        flat = np.ascontiguousarray(array, dtype=np.float32).ravel()
        tensors.append(
            tensor_pb2.Tensor(
                name=name, datatype="FP32", shape=array.shape, data=tensor_pb2.TensorData(fp32=flat.tolist())
            )
        )
    return gateway_pb2.InferRequest(model_id=model, inputs=tensors).SerializeToString()


async def run_unary_load(
    target: str,
    label: str,
    method: str,
    payload: bytes,
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    metadata: Sequence[tuple[str, str]] = (),
    deadline_s: float = 30.0,
    root_certificates: bytes | None = None,
) -> LoadResult:
    """Closed loop: `concurrency` calls of `method` in flight for warmup + duration (bytes in, bytes out);
    over TLS with `root_certificates`."""
    async with open_channel(target, root_certificates) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        measure_from = time.perf_counter() + warmup
        stop_at = measure_from + duration
        latencies: list[float] = []
        errors: list[str] = []
        last_done = measure_from
        md = tuple(metadata) or None

        async def worker() -> None:
            nonlocal last_done
            while (started := time.perf_counter()) < stop_at:
                try:
                    await call(payload, timeout=deadline_s, metadata=md)
                    error = ""
                except grpc.aio.AioRpcError as failure:
                    error = f"{failure.code().name}: {failure.details()}"
                finished = time.perf_counter()
                if started < measure_from:
                    continue
                last_done = max(last_done, finished)
                if error:
                    errors.append(error)
                else:
                    latencies.append(finished - started)

        cpu = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu = time.process_time() - cpu
    window = max(stop_at, last_done) - measure_from
    ms = np.asarray(latencies) * 1e3 if latencies else np.asarray([math.nan])
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return LoadResult(
        target=f"{label} {target}",
        model=label.split(":")[0],
        concurrency=concurrency,
        duration_s=window,
        requests=len(latencies),
        errors=len(errors),
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        mean_ms=float(ms.mean()),
        client_cpu_pct=100.0 * cpu / (window + warmup),
        error_samples=tuple(dict.fromkeys(errors))[:5],
    )
