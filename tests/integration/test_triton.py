"""The model repository served by a real Triton: answers, accuracy, errors, two instances, load/unload."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from models.digits import HeldOutSplit
from services.stack.triton import SHM_DIR, TritonInstance, TritonStartError, start_triton
from tests.support.polling import wait_for

pytestmark = pytest.mark.integration

_DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.int64): "INT64"}


def _input(name: str, array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), _DTYPES[array.dtype])
    tensor.set_data_from_numpy(array)
    return tensor


def _session(model_repository: Path, model: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_repository / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture
def client(triton: TritonInstance) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(triton.grpc_address)


@pytest.mark.parametrize(("model", "shape"), [("affine", (4,)), ("affine_batched", (3, 4))])
def test_affine_returns_two_x_plus_one(
    client: grpcclient.InferenceServerClient, model: str, shape: tuple[int, ...]
) -> None:
    x = np.random.default_rng(7).normal(size=shape).astype(np.float32)
    y = client.infer(model, [_input("x", x)]).as_numpy("y")
    assert y is not None and y.dtype == np.float32
    np.testing.assert_array_equal(y, 2 * x + 1)


def test_digits_is_accurate_on_held_out_split_and_agrees_with_onnxruntime(
    client: grpcclient.InferenceServerClient, digits_held_out: HeldOutSplit, model_repository: Path
) -> None:
    pixels = digits_held_out.pixels
    labels, probabilities = [], []
    for start in range(0, len(pixels), 128):  # max_batch_size is 128
        result = client.infer("digits", [_input("pixels", pixels[start : start + 128])])
        labels.append(result.as_numpy("label"))
        probabilities.append(result.as_numpy("probabilities"))
    served_labels = np.concatenate(labels)
    served_probabilities = np.concatenate(probabilities)
    assert served_labels.shape == (len(pixels), 1) and served_labels.dtype == np.int64
    assert served_probabilities.shape == (len(pixels), 10)

    accuracy = float(np.mean(served_labels[:, 0] == digits_held_out.labels))
    assert accuracy >= 0.9, f"held-out accuracy through Triton {accuracy:.3f}"

    local_labels, local_probabilities = _session(model_repository, "digits").run(None, {"pixels": pixels})
    np.testing.assert_array_equal(served_labels, local_labels)
    np.testing.assert_allclose(served_probabilities, local_probabilities, rtol=1e-5, atol=1e-6)


async def test_digits_dynamic_batching_gives_each_request_its_own_answer(
    triton: TritonInstance, digits_held_out: HeldOutSplit, model_repository: Path
) -> None:
    # Many concurrent requests of different sizes make the dynamic batcher merge them in one model
    # execution; onnx_runner.py must split the outputs back to the right callers.
    sizes = [1 + i % 7 for i in range(48)]
    offsets = np.cumsum([0, *sizes[:-1]])
    chunks = [digits_held_out.pixels[o : o + n] for o, n in zip(offsets, sizes, strict=True)]
    expected = [_session(model_repository, "digits").run(["label"], {"pixels": c})[0] for c in chunks]

    async with aioclient.InferenceServerClient(triton.grpc_address) as client:
        before = (await client.get_inference_statistics("digits")).model_stats[0]

        async def infer(chunk: np.ndarray) -> np.ndarray:
            tensor = aioclient.InferInput("pixels", list(chunk.shape), "FP32")
            tensor.set_data_from_numpy(chunk)
            return (await client.infer("digits", [tensor], outputs=[aioclient.InferRequestedOutput("label")])).as_numpy(
                "label"
            )

        answers = await asyncio.gather(*(infer(chunk) for chunk in chunks))
        after = (await client.get_inference_statistics("digits")).model_stats[0]

    for answer, want in zip(answers, expected, strict=True):
        np.testing.assert_array_equal(answer, want)
    executions = after.execution_count - before.execution_count
    assert executions < len(chunks), "the dynamic batcher never merged requests"
    assert after.inference_count - before.inference_count == sum(sizes)


def test_resnet18_matches_onnxruntime_in_process(
    client: grpcclient.InferenceServerClient, model_repository: Path
) -> None:
    images = np.random.default_rng(3).random((2, 3, 224, 224), dtype=np.float32)
    logits = client.infer("resnet18", [_input("input", images)]).as_numpy("logits")
    assert logits is not None and logits.shape == (2, 1000) and logits.dtype == np.float32

    (local,) = _session(model_repository, "resnet18").run(["logits"], {"input": images})
    np.testing.assert_allclose(logits, local, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(logits.argmax(axis=1), local.argmax(axis=1))


@pytest.mark.parametrize(
    ("model", "name", "array", "message"),
    [
        ("affine", "x", np.zeros(3, np.float32), "unexpected shape for input 'x'"),
        ("affine", "x", np.zeros(4, np.float64), "data-type is 'FP64', but model 'affine' expects 'FP32'"),
        ("affine", "z", np.zeros(4, np.float32), "unexpected inference input 'z'"),
        ("digits", "pixels", np.zeros((1, 63), np.float32), "unexpected shape for input 'pixels'"),
        ("digits", "pixels", np.zeros((129, 64), np.float32), "batch-size must be <= 128"),
    ],
    ids=["shape", "dtype", "name", "features", "batch-size"],
)
def test_malformed_request_is_invalid_argument_and_server_keeps_serving(
    client: grpcclient.InferenceServerClient, model: str, name: str, array: np.ndarray, message: str
) -> None:
    with pytest.raises(InferenceServerException) as raised:
        client.infer(model, [_input(name, array)])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in str(raised.value.message())

    y = client.infer("affine", [_input("x", np.ones(4, np.float32))]).as_numpy("y")
    np.testing.assert_array_equal(y, np.full(4, 3, np.float32))


def test_two_tritons_serve_side_by_side(triton_pair: tuple[TritonInstance, TritonInstance]) -> None:
    first, second = triton_pair
    assert first.pid != second.pid
    assert {first.grpc_port, first.http_port, first.metrics_port}.isdisjoint(
        {second.grpc_port, second.http_port, second.metrics_port}
    )
    x = np.arange(4, dtype=np.float32)
    for instance in triton_pair:
        assert instance.is_running()
        client = grpcclient.InferenceServerClient(instance.grpc_address)
        assert client.is_server_ready()
        np.testing.assert_array_equal(client.infer("affine", [_input("x", x)]).as_numpy("y"), 2 * x + 1)


def test_unloaded_model_is_not_ready_until_loaded_again(client: grpcclient.InferenceServerClient) -> None:
    model = "affine_batched"
    x = np.ones((1, 4), np.float32)
    try:
        client.unload_model(model)
        # Triton's unload returns once unloading has started and signals nothing when it is done.
        wait_for(lambda: not client.is_model_ready(model), timeout_s=30, poll_s=0.1)
        with pytest.raises(InferenceServerException) as raised:
            client.infer(model, [_input("x", x)])
        assert raised.value.status() == "StatusCode.NOT_FOUND"

        client.load_model(model)  # returns when the load has finished
        assert client.is_model_ready(model)
        np.testing.assert_array_equal(client.infer(model, [_input("x", x)]).as_numpy("y"), 2 * x + 1)
    finally:
        # The session's Triton is shared: leave the model loaded for the tests that follow.
        if not client.is_model_ready(model):
            client.load_model(model)


def test_failed_start_raises_with_the_model_error_from_the_log(tmp_path: Path) -> None:
    version = tmp_path / "repository" / "broken" / "1"
    version.mkdir(parents=True)
    (version.parent / "config.pbtxt").write_text(
        'name: "broken"\nbackend: "python"\n'
        'input { name: "x" data_type: TYPE_FP32 dims: [1] }\noutput { name: "y" data_type: TYPE_FP32 dims: [1] }\n'
    )
    (version / "model.py").write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('broken on purpose')\n"
    )
    with pytest.raises(TritonStartError, match="broken on purpose"):
        start_triton(tmp_path / "repository", load_models=["broken"], ready_timeout_s=60)


def _live_members(process_group: int) -> list[int]:
    """PIDs in a process group that are not zombies (a reaped-later zombie holds no resources)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, ...
        if int(fields[2]) == process_group and fields[0] != "Z":
            members.append(int(entry))
    return members


def test_stop_after_a_hard_kill_leaves_no_stub_or_shared_memory(model_repository: Path, tmp_path: Path) -> None:
    instance = start_triton(model_repository, load_models=["affine"], state_dir=tmp_path / "triton")
    stubs = [pid for pid in _live_members(instance.pid) if pid != instance.pid]
    regions = list(SHM_DIR.glob(f"{instance.shm_prefix}*"))
    assert stubs, "the affine model should run in a Python backend stub process"
    assert regions, "the stub should have created its shared-memory region"

    instance.process.kill()  # what a crash or an OOM kill does: no graceful shutdown, shm left behind
    instance.stop()

    assert not instance.is_running()
    assert _live_members(instance.pid) == []
    assert list(SHM_DIR.glob(f"{instance.shm_prefix}*")) == []
