"""The models servegrid serves and how each one's Triton config.pbtxt is rendered for a backend and device."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from models import digits, resnet18


class Backend(enum.StrEnum):
    """How ONNX models are executed: the Python backend (the only one in the pytriton wheel) or native ORT."""

    PYTHON = "python"
    ONNXRUNTIME = "onnxruntime"


class Device(enum.StrEnum):
    CPU = "cpu"
    GPU = "gpu"


class Kind(enum.StrEnum):
    ONNX = "onnx"  # model.onnx; run by onnx_runner.py on the Python backend, or by the onnxruntime backend
    PYTHON = "python"  # a numpy model.py; always the Python backend


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton's name, e.g. "TYPE_FP32"
    dims: tuple[int, ...]  # per item: without the batch dimension when max_batch_size > 0


@dataclass(frozen=True)
class Batching:
    """Triton's dynamic batcher settings; only worth it where merging requests saves work."""

    max_queue_delay_us: int
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: Kind
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str
    max_batch_size: int = 0  # 0: no batch dimension; requests carry exactly `dims`
    batching_cpu: Batching | None = None
    batching_gpu: Batching | None = None
    python_source: str | None = None  # Kind.PYTHON: file in models/ copied to <version>/model.py
    gpu_capable: bool = True  # False for numpy models: a GPU instance would only waste the device
    # Read by both onnx_runner.py and the native onnxruntime backend (same keys).
    parameters: dict[str, str] = field(default_factory=dict)

    def batching(self, device: Device) -> Batching | None:
        return self.batching_gpu if device is Device.GPU else self.batching_cpu

    def backend_name(self, backend: Backend) -> str:
        return "onnxruntime" if self.kind is Kind.ONNX and backend is Backend.ONNXRUNTIME else "python"

    def version_files(self, backend: Backend) -> tuple[str, ...]:
        """Files a version directory needs for this backend."""
        if self.kind is Kind.PYTHON:
            return ("model.py",)
        if backend is Backend.ONNXRUNTIME:
            return ("model.onnx",)
        return ("model.py", "model.onnx")


_AFFINE_IO = (
    (TensorSpec("x", "TYPE_FP32", (4,)),),
    (TensorSpec("y", "TYPE_FP32", (4,)),),
)

MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="affine",
        kind=Kind.PYTHON,
        inputs=_AFFINE_IO[0],
        outputs=_AFFINE_IO[1],
        description="y = 2x + 1 on FP32[4], one request at a time (no batch dimension): protocol and load tests",
        python_source="affine_model.py",
        gpu_capable=False,
    ),
    ModelSpec(
        name="affine_batched",
        kind=Kind.PYTHON,
        inputs=_AFFINE_IO[0],
        outputs=_AFFINE_IO[1],
        description="the same y = 2x + 1 with a batch dimension and Triton's dynamic batcher: requests send [n, 4]",
        max_batch_size=64,
        # A light model gains most from batching: one Triton <-> stub round trip serves many requests.
        batching_cpu=Batching(max_queue_delay_us=100),
        batching_gpu=Batching(max_queue_delay_us=100),
        python_source="affine_model.py",
        gpu_capable=False,
    ),
    ModelSpec(
        name="digits",
        kind=Kind.ONNX,
        inputs=(TensorSpec(digits.INPUT_NAME, "TYPE_FP32", (digits.NUM_FEATURES,)),),
        outputs=(
            TensorSpec(digits.LABEL_NAME, "TYPE_INT64", (1,)),
            TensorSpec(digits.PROBABILITIES_NAME, "TYPE_FP32", (digits.NUM_CLASSES,)),
        ),
        description="8x8 handwritten digits (pixels 0..16) -> label and class probabilities; scikit-learn",
        max_batch_size=128,
        batching_cpu=Batching(max_queue_delay_us=100),
        batching_gpu=Batching(max_queue_delay_us=100),
        # A 64x10 linear model: extra threads cost more to wake than they save.
        parameters={"intra_op_thread_count": "1"},
    ),
    ModelSpec(
        name="resnet18",
        kind=Kind.ONNX,
        inputs=(TensorSpec(resnet18.INPUT_NAME, "TYPE_FP32", resnet18.IMAGE_SHAPE),),
        outputs=(TensorSpec(resnet18.OUTPUT_NAME, "TYPE_FP32", (resnet18.NUM_CLASSES,)),),
        description="ResNet18 architecture with seeded random weights: [3, 224, 224] -> 1000 logits",
        max_batch_size=16,
        # Measured here: batching does nothing for ResNet18 on 2 CPU cores (compute bound) and only
        # adds queueing delay, so the CPU config leaves it off; a GPU gains from larger batches.
        batching_gpu=Batching(max_queue_delay_us=500, preferred_batch_sizes=(4, 8, 16)),
    ),
)


def model_spec(name: str) -> ModelSpec:
    for spec in MODELS:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown model {name!r}; known: {', '.join(m.name for m in MODELS)}")


def render_config(spec: ModelSpec, backend: Backend, device: Device) -> str:
    """config.pbtxt text for one model, built as a ModelConfig message so it is valid by construction."""
    config = mc.ModelConfig(name=spec.name, backend=spec.backend_name(backend), max_batch_size=spec.max_batch_size)
    for tensor in spec.inputs:
        config.input.add(name=tensor.name, data_type=mc.DataType.Value(tensor.data_type), dims=tensor.dims)
    for tensor in spec.outputs:
        config.output.add(name=tensor.name, data_type=mc.DataType.Value(tensor.data_type), dims=tensor.dims)
    on_gpu = device is Device.GPU and spec.gpu_capable
    kind = mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(count=1, kind=kind)
    batching = spec.batching(device) if spec.max_batch_size > 0 else None
    if batching is not None:
        config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
        config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
    for key, value in spec.parameters.items():
        config.parameters[key].string_value = value
    header = (
        f"# {spec.description}\n"
        f"# Generated by `python -m models.build --backend {backend} --device {device}`;"
        " edit models/catalog.py, not this file.\n"
    )
    return header + text_format.MessageToString(config)
