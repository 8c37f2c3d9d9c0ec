"""Model catalog, config rendering for each backend/device, repository layout and the artifact cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from models import build, digits, resnet18
from models.catalog import MODELS, Backend, Device, model_spec, render_config

FLAVOURS = [(backend, device) for backend in Backend for device in Device]


def _config(name: str, backend: Backend, device: Device) -> mc.ModelConfig:
    return text_format.Parse(render_config(model_spec(name), backend, device), mc.ModelConfig())


@pytest.mark.parametrize(("backend", "device"), FLAVOURS)
def test_every_rendered_config_parses_as_a_triton_model_config(backend: Backend, device: Device) -> None:
    for spec in MODELS:
        config = _config(spec.name, backend, device)
        assert config.name == spec.name
        assert [t.name for t in config.input] == [t.name for t in spec.inputs]
        assert [tuple(t.dims) for t in config.output] == [t.dims for t in spec.outputs]
        assert len(config.instance_group) == 1


def test_python_flavour_puts_every_model_on_the_python_backend_on_cpu() -> None:
    for spec in MODELS:
        config = _config(spec.name, Backend.PYTHON, Device.CPU)
        assert config.backend == "python"
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU


def test_onnxruntime_flavour_serves_onnx_models_natively_and_keeps_numpy_models_on_python() -> None:
    backends = {spec.name: _config(spec.name, Backend.ONNXRUNTIME, Device.CPU).backend for spec in MODELS}
    assert backends == {
        "affine": "python",
        "affine_batched": "python",
        "digits": "onnxruntime",
        "resnet18": "onnxruntime",
    }


def test_gpu_flavour_puts_onnx_models_on_the_gpu_and_batches_resnet18_only_there() -> None:
    kinds = {spec.name: _config(spec.name, Backend.ONNXRUNTIME, Device.GPU).instance_group[0].kind for spec in MODELS}
    assert kinds["digits"] == kinds["resnet18"] == mc.ModelInstanceGroup.KIND_GPU
    assert kinds["affine"] == kinds["affine_batched"] == mc.ModelInstanceGroup.KIND_CPU  # numpy: no GPU work
    assert _config("resnet18", Backend.ONNXRUNTIME, Device.GPU).HasField("dynamic_batching")
    assert not _config("resnet18", Backend.PYTHON, Device.CPU).HasField("dynamic_batching")


def test_affine_variants_differ_only_in_batching() -> None:
    plain = _config("affine", Backend.PYTHON, Device.CPU)
    batched = _config("affine_batched", Backend.PYTHON, Device.CPU)
    assert plain.max_batch_size == 0 and not plain.HasField("dynamic_batching")
    assert batched.max_batch_size == 64 and batched.HasField("dynamic_batching")
    assert plain.input == batched.input and plain.output == batched.output


def _fake_onnx(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name in ("digits", "resnet18"):
        files[name] = tmp_path / f"{name}.onnx"
        files[name].write_bytes(f"not really {name}".encode())
    return files


def test_render_repository_lays_out_each_flavour_and_rerenders_nothing(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    onnx_files = _fake_onnx(tmp_path)

    assert build.render_repository(repository, onnx_files, backend=Backend.PYTHON)
    assert sorted(p.name for p in (repository / "digits" / "1").iterdir()) == ["model.onnx", "model.py"]
    assert (repository / "digits" / "1" / "model.py").read_bytes() == build.ONNX_RUNNER.read_bytes()
    assert (repository / "affine" / "1" / "model.py").read_bytes() == (
        build.MODELS_DIR / "affine_model.py"
    ).read_bytes()
    assert build.render_repository(repository, onnx_files, backend=Backend.PYTHON) == []

    build.render_repository(repository, onnx_files, backend=Backend.ONNXRUNTIME)
    assert sorted(p.name for p in (repository / "digits" / "1").iterdir()) == ["model.onnx"]
    assert sorted(p.name for p in (repository / "affine" / "1").iterdir()) == ["model.py"]
    assert 'backend: "onnxruntime"' in (repository / "resnet18" / "config.pbtxt").read_text()


def _identity_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"])],
        "tiny",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])],
    )
    return helper.make_model(graph)


def test_build_artifacts_skips_what_is_built_and_rebuilds_on_force_or_new_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"digits": 0, "resnet18": 0}

    def fake_train() -> digits.TrainedDigits:
        calls["digits"] += 1
        held_out = digits.HeldOutSplit(np.zeros((2, 64), np.float32), np.zeros(2, np.int64))
        return digits.TrainedDigits(model=_identity_model(), held_out=held_out, test_accuracy=1.0)

    def fake_resnet(seed: int = 0) -> onnx.ModelProto:
        calls["resnet18"] += 1
        return _identity_model()

    monkeypatch.setattr(digits, "train_digits", fake_train)
    monkeypatch.setattr(resnet18, "build_resnet18", fake_resnet)

    artifacts = build.build_artifacts(tmp_path, log=False)
    assert artifacts.onnx_files["digits"].exists() and artifacts.digits_held_out.exists()
    build.build_artifacts(tmp_path, log=False)
    assert calls == {"digits": 1, "resnet18": 1}

    build.build_artifacts(tmp_path, force=True, log=False)
    assert calls == {"digits": 2, "resnet18": 2}

    monkeypatch.setitem(build.RECIPES, "resnet18", build.RECIPES["resnet18"] + 1)
    build.build_artifacts(tmp_path, log=False)
    assert calls == {"digits": 2, "resnet18": 3}


def test_resnet18_graph_has_torchvision_layout() -> None:
    model = resnet18.build_resnet18(seed=0)
    ops = [node.op_type for node in model.graph.node]
    assert resnet18.trainable_parameter_count(model) == 11_689_512  # torchvision.models.resnet18
    assert ops.count("Conv") == 20 and ops.count("BatchNormalization") == 20 and ops.count("Add") == 8
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    # Same seed, same weights: rebuilding an artifact reproduces it.
    again = resnet18.build_resnet18(seed=0)
    assert model.graph.initializer[0].raw_data == again.graph.initializer[0].raw_data
