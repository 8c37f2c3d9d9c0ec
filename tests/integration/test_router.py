"""The router in front of two real Tritons: parity with Triton, errors, canary, shadow, balancing, policy pushes."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client import REGISTRY
from servegrid.registry.v1 import registry_pb2 as rpb
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.loadgen import encode_infer_request
from services.router.settings import RouterSettings
from services.runtime.errors import status_details
from services.stack.triton import TritonInstance
from tests.support.router_harness import DelayProxy, FakeRegistry, RouterThread, route, wait_until, write_routes

pytestmark = pytest.mark.integration

MODELS = ("affine", "digits", "resnet18")
AFFINE_X = np.arange(4, dtype=np.float32)
_DTYPES = {np.dtype(np.float32): "FP32"}


def _settings(**overrides: object) -> RouterSettings:
    base: dict[str, object] = {
        "port": 0,
        "metrics_port": None,
        "use_uvloop": False,
        "grace_period_s": 0.2,
        "health_interval_s": 0.2,
        "probe_interval_s": 0.2,
        "deadline_margin_s": 0.05,
    }
    base.update(overrides)
    return RouterSettings(**base)  # type: ignore[arg-type]


def _inputs(model: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    if model == "affine":
        return {"x": AFFINE_X}
    if model == "digits":
        return {"pixels": rng.integers(0, 17, (5, 64)).astype(np.float32)}
    return {"input": rng.random((1, 3, 224, 224), dtype=np.float32)}


@pytest.fixture(scope="module")
def slow_proxies(triton_pair: tuple[TritonInstance, TritonInstance]) -> Iterator[tuple[DelayProxy, DelayProxy]]:
    """Two delay proxies in front of Triton B: 50 ms (a slow backend) and 3 s (a stuck one)."""
    holder = RouterThread(_settings()).start_loop()  # a loop thread of their own, no router
    slow = holder.run(DelayProxy(triton_pair[1].grpc_address, 0.05).start())
    stuck = holder.run(DelayProxy(triton_pair[1].grpc_address, 3.0).start())
    yield slow, stuck
    holder.run(slow.stop())
    holder.run(stuck.stop())
    holder.stop_loop()


@pytest.fixture(scope="module")
def router(
    triton_pair: tuple[TritonInstance, TritonInstance],
    slow_proxies: tuple[DelayProxy, DelayProxy],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RouterThread]:
    a, b = triton_pair
    both = [("a", a.grpc_address), ("b", b.grpc_address)]
    slow, stuck = slow_proxies
    routes = [
        *(route(model, [(1, model, 100, both)]) for model in MODELS),
        route("canary", [(1, "affine", 90, both), (2, "affine", 10, both)], sticky_header="x-user"),
        route("shadowed", [(1, "digits", 100, [both[0]])], shadow=(2, "digits", [both[1]], 1.0)),
        route("slowpath", [(1, "affine", 100, [both[0], ("a-slow", slow.address)])]),
        route("stuck", [(1, "affine", 100, [("b-stuck", stuck.address)])]),
        route("ghost", [(1, "affine", 100, [("dead", "127.0.0.1:9")])]),
    ]
    path = write_routes(tmp_path_factory.mktemp("router") / "routes.json", routes)
    thread = RouterThread(_settings(routes_file=path)).start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and thread.router.pool.backends["dead"].health != 2:
        time.sleep(0.05)
    yield thread
    thread.stop()


@pytest.fixture
async def stub(router: RouterThread) -> AsyncIterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(router.address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _request(
    model: str, version: str = "", inputs: dict[str, np.ndarray] | None = None
) -> service_pb2.ModelInferRequest:
    return service_pb2.ModelInferRequest.FromString(
        encode_infer_request(model, inputs if inputs is not None else _inputs("affine"), version=version)
    )


def _tensor(name: str, array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), _DTYPES[array.dtype])
    tensor.set_data_from_numpy(array)
    return tensor


def test_tritonclient_gets_the_same_answers_through_the_router(
    router: RouterThread, triton_pair: tuple[TritonInstance, TritonInstance]
) -> None:
    direct = grpcclient.InferenceServerClient(triton_pair[0].grpc_address)
    routed = grpcclient.InferenceServerClient(router.address)
    assert routed.is_server_live() and routed.is_server_ready()
    for model in MODELS:
        assert routed.is_model_ready(model)
        assert routed.get_model_metadata(model, as_json=True) == direct.get_model_metadata(model, as_json=True)
        assert routed.get_model_config(model, as_json=True) == direct.get_model_config(model, as_json=True)
        inputs = [_tensor(name, array) for name, array in _inputs(model).items()]
        ours, theirs = routed.infer(model, inputs), direct.infer(model, inputs)
        response, expected = ours.get_response(), theirs.get_response()
        assert (response.model_name, response.model_version) == (expected.model_name, expected.model_version)
        for output in expected.outputs:
            np.testing.assert_array_equal(ours.as_numpy(output.name), theirs.as_numpy(output.name))
    np.testing.assert_array_equal(routed.infer("affine", [_tensor("x", AFFINE_X)]).as_numpy("y"), 2 * AFFINE_X + 1)


async def _fails(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


def _reason(error: grpc.aio.AioRpcError) -> str | None:
    _, info = status_details(error.trailing_metadata())
    return info.reason if info is not None else None


async def test_unknown_model_and_version_are_not_found(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    error = await _fails(stub.ModelInfer(_request("no-such-model"), timeout=5))
    assert error.code() is grpc.StatusCode.NOT_FOUND and _reason(error) == "MODEL_NOT_FOUND"
    error = await _fails(stub.ModelInfer(_request("affine", "42"), timeout=5))
    assert error.code() is grpc.StatusCode.NOT_FOUND and _reason(error) == "VERSION_NOT_FOUND"
    error = await _fails(stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="no-such-model"), timeout=5))
    assert error.code() is grpc.StatusCode.NOT_FOUND and _reason(error) == "MODEL_NOT_FOUND"


async def test_no_healthy_backend_is_unavailable_naming_the_model(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    error = await _fails(stub.ModelInfer(_request("ghost"), timeout=5))
    assert error.code() is grpc.StatusCode.UNAVAILABLE and _reason(error) == "NO_HEALTHY_BACKEND"
    assert "ghost" in (error.details() or "")


async def test_deadline_is_propagated_and_answered_in_time(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    started = time.monotonic()
    error = await _fails(stub.ModelInfer(_request("stuck"), timeout=0.5))
    took = time.monotonic() - started
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert took < 1.5  # the stuck backend takes 3 s: the router did not wait for it
    assert _reason(error) == "DEADLINE_EXCEEDED"


async def test_triton_errors_pass_through(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    bad = _request("affine", inputs={"x": np.arange(5, dtype=np.float32)})  # affine takes FP32[4]
    error = await _fails(stub.ModelInfer(bad, timeout=5))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "affine" in (error.details() or "") and "shape" in (error.details() or "")


async def _versions(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    model: str,
    count: int,
    concurrency: int = 8,
    metadata: Sequence[tuple[str, str]] = (),
) -> Counter[str]:
    seen: Counter[str] = Counter()
    payload = _request(model)

    async def caller(n: int) -> None:
        for _ in range(n):
            reply = await stub.ModelInfer(payload, timeout=10, metadata=tuple(metadata) or None)
            np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.float32), 2 * AFFINE_X + 1)
            seen[reply.model_version] += 1

    await asyncio.gather(*(caller(count // concurrency) for _ in range(concurrency)))
    return seen


async def test_canary_splits_90_10_and_sticky_header_pins_a_version(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    seen = await _versions(stub, "canary", 1000)
    assert sum(seen.values()) == 1000
    assert abs(seen["2"] / 1000 - 0.10) < 0.03, seen
    for user in ("u1", "u2", "u3"):
        pinned = await _versions(stub, "canary", 16, concurrency=2, metadata=[("x-user", user)])
        assert len(pinned) == 1, (user, pinned)


async def test_shadow_copies_without_changing_answers_and_records_differences(
    router: RouterThread,
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    triton_pair: tuple[TritonInstance, TritonInstance],
) -> None:
    inputs = _inputs("digits")
    async with grpc.aio.insecure_channel(triton_pair[0].grpc_address) as channel:
        expected = await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            _request("digits", inputs=inputs)
        )
    for _ in range(20):
        reply = await stub.ModelInfer(_request("shadowed", inputs=inputs), timeout=10)
        assert list(reply.raw_output_contents) == list(expected.raw_output_contents)
        assert reply.model_name == "shadowed" and reply.model_version == "1"
    stats = router.router.shadow.stats

    await wait_until(lambda: stats["shadowed"].compared + stats["shadowed"].errors + stats["shadowed"].dropped >= 20)
    shadow = stats["shadowed"]
    assert shadow.errors == 0 and shadow.compared >= 10, shadow
    assert shadow.max_abs_diff == 0.0 and shadow.argmax_mismatches == 0
    compared = REGISTRY.get_sample_value(
        "servegrid_router_shadow_requests_total", {"model": "shadowed", "version": "2", "outcome": "compared"}
    )
    assert compared == shadow.compared


async def test_slow_backend_gets_a_smaller_share(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, slow_proxies: tuple[DelayProxy, DelayProxy]
) -> None:
    slow = slow_proxies[0]
    before = slow.calls
    seen = await _versions(stub, "slowpath", 400)
    share = (slow.calls - before) / sum(seen.values())
    # Round-robin would give it half; P2C on EWMA x in-flight sends it only what the fast one's queue
    # spills over, plus an occasional retry once its score has decayed.
    assert share < 0.2, share


async def test_drained_backend_gets_no_new_requests(
    router: RouterThread, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    pool = router.router.pool
    pool.backends["a"].drained = True
    try:
        before = pool.backends["a"].requests_total
        await _versions(stub, "affine", 80)
        assert pool.backends["a"].requests_total == before
    finally:
        pool.backends["a"].drained = False


async def test_policy_change_from_the_registry_applies_within_a_second_without_errors(
    triton_pair: tuple[TritonInstance, TritonInstance],
) -> None:
    both = [("a", triton_pair[0].grpc_address), ("b", triton_pair[1].grpc_address)]
    before = route("policy", [(1, "affine", 100, both), (2, "affine", 0, both)])
    after = route("policy", [(1, "affine", 0, both), (2, "affine", 100, both)])
    registry = await FakeRegistry([before]).start()
    router = RouterThread(_settings(registry_address=f"127.0.0.1:{registry.port}")).start()
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            await wait_until(lambda: "policy" in router.router.table.routes)
            payload = _request("policy")
            answers: list[tuple[float, str]] = []
            errors: list[grpc.aio.AioRpcError] = []
            stop_at = time.monotonic() + 2.5

            async def caller() -> None:
                while time.monotonic() < stop_at:
                    try:
                        reply = await stub.ModelInfer(payload, timeout=5)
                        answers.append((time.monotonic(), reply.model_version))
                    except grpc.aio.AioRpcError as error:
                        errors.append(error)

            changed_at = stop_at

            async def change() -> None:
                nonlocal changed_at
                await asyncio.sleep(0.8)
                registry.push(upserts=[after])
                changed_at = time.monotonic()

            await asyncio.gather(change(), *(caller() for _ in range(4)))
        assert not errors, errors[:3]
        assert {v for t, v in answers if t < changed_at} == {"1"}
        first_new = min(t for t, v in answers if v == "2")
        last_old = max(t for t, v in answers if v == "1")
        assert first_new - changed_at < 1.0 and last_old - changed_at < 1.0
        assert router.router.table.revision == registry.revision
    finally:
        await asyncio.to_thread(router.stop)
        await registry.stop()


def test_routes_file_round_trips(tmp_path: Path) -> None:
    path = write_routes(tmp_path / "r.json", [route("m", [(1, "affine", 100, [("a", "h:1")])])], revision=9)
    from services.router.table import load_routes_file

    loaded = load_routes_file(path)
    assert loaded.reset and loaded.revision == 9 and loaded.routes[0].versions[0].backends[0].address == "h:1"
    assert isinstance(loaded, rpb.WatchRoutesResponse)
