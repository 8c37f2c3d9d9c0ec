"""The ModelInfer hot path with fake backends: renaming, retries to another backend, opt-in retries, deadlines."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from bench.loadgen import encode_infer_request
from services.router.server import Router, build_router
from services.router.settings import RouterSettings
from services.runtime.errors import status_details
from tests.support.router_harness import route

X = np.arange(4, dtype=np.float32)


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: Any = None) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, trailing


class FakeContext:
    def __init__(self, metadata: Sequence[tuple[str, str]] = (), remaining: float | None = None) -> None:
        self.metadata = tuple(metadata)
        self.remaining = remaining

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: grpc.StatusCode, details: str, trailing: Any = None) -> None:
        raise Aborted(code, details, trailing)


class RpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=f"fake {code.name}")


class FakeBackend:
    """Answers like Triton (model name and version "1" first), or fails with the codes queued."""

    def __init__(self, failures: Sequence[grpc.StatusCode] = ()) -> None:
        self.failures = list(failures)
        self.requests: list[service_pb2.ModelInferRequest] = []

    async def __call__(self, data: bytes, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        request = service_pb2.ModelInferRequest.FromString(bytes(data))
        self.requests.append(request)
        if self.failures:
            raise RpcError(self.failures.pop(0))
        return service_pb2.ModelInferResponse(model_name=request.model_name, model_version="1").SerializeToString()


@pytest.fixture
async def router() -> AsyncIterator[Router]:
    settings = RouterSettings(
        port=0,
        metrics_port=None,
        retry_backoff_base_s=0.0,
        # Ejection and breakers are tested on their own; here every failure must reach the retry logic.
        eject_consecutive_failures=1000,
        breaker_consecutive_failures=1000,
        breaker_min_requests=1000,
    )
    built = build_router(settings)
    built.table.reset([route("scorer", [(3, "affine", 100, [("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")])])], revision=1)
    for backend in built.pool.backends.values():
        backend.health = 1  # as if probed
    yield built
    await built.pool.close()


def wire(router: Router, **fakes: FakeBackend) -> None:
    for backend_id, fake in fakes.items():
        router.pool.backends[backend_id].infer = fake


async def infer(router: Router, context: FakeContext, version: str = "") -> service_pb2.ModelInferResponse:
    data = encode_infer_request("scorer", {"x": X}, version=version)
    return service_pb2.ModelInferResponse.FromString(await router.forwarder.model_infer(data, context))


async def test_names_are_rewritten_both_ways(router: Router) -> None:
    a, b = FakeBackend(), FakeBackend()
    wire(router, a=a, b=b)
    reply = await infer(router, FakeContext(), version="3")
    sent = (a.requests + b.requests)[0]
    assert (sent.model_name, sent.model_version) == ("affine", "")  # triton_model_version 0: Triton's latest
    np.testing.assert_array_equal(np.frombuffer(sent.raw_input_contents[0], np.float32), X)
    assert (reply.model_name, reply.model_version) == ("scorer", "3")


async def test_unavailable_is_retried_on_the_other_backend(router: Router) -> None:
    broken, healthy = FakeBackend([grpc.StatusCode.UNAVAILABLE] * 100), FakeBackend()
    wire(router, a=broken, b=healthy)
    for _ in range(20):
        assert (await infer(router, FakeContext())).model_name == "scorer"
    # Every call succeeded on b; none tried the broken backend twice (a retry goes elsewhere).
    assert len(healthy.requests) == 20 and len(broken.requests) <= 20


async def test_internal_errors_are_retried_only_when_the_caller_opts_in(router: Router) -> None:
    a, b = FakeBackend([grpc.StatusCode.INTERNAL]), FakeBackend([grpc.StatusCode.INTERNAL])
    wire(router, a=a, b=b)
    with pytest.raises(Aborted) as caught:
        await infer(router, FakeContext())
    assert caught.value.code is grpc.StatusCode.INTERNAL and caught.value.details == "fake INTERNAL"
    assert len(a.requests) + len(b.requests) == 1
    reply = await infer(router, FakeContext(metadata=[("x-servegrid-retry", "true")]))
    assert reply.model_name == "scorer"


async def test_spent_deadline_is_deadline_exceeded_with_error_info(router: Router) -> None:
    wire(router, a=FakeBackend(), b=FakeBackend())
    with pytest.raises(Aborted) as caught:
        await infer(router, FakeContext(remaining=0.001))
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    _, info = status_details(caught.value.trailing)
    assert info is not None and info.reason == "DEADLINE_EXCEEDED"


async def test_retry_budget_bounds_retries(router: Router) -> None:
    a = FakeBackend([grpc.StatusCode.UNAVAILABLE] * 1000)
    b = FakeBackend([grpc.StatusCode.UNAVAILABLE] * 1000)
    wire(router, a=a, b=b)
    router.forwarder.budget.cap = 2.0
    router.forwarder.budget._tokens = 2.0
    router.forwarder.budget.min_per_s = 0.0
    router.forwarder.budget.ratio = 0.0
    for _ in range(5):
        with pytest.raises(Aborted):
            await infer(router, FakeContext())
    assert len(a.requests) + len(b.requests) == 5 + 2  # five first tries, two budgeted retries
