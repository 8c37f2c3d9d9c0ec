"""Build the ResNet18 architecture as an ONNX graph with seeded random weights (no download, no torch)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
NUM_CLASSES = 1000
IMAGE_SHAPE = (3, 224, 224)
# Opset 17 / IR 8 keeps the file loadable by the onnxruntime inside older production Triton images
# (Triton 2.51 ships onnxruntime 1.19, which reads IR <= 10).
OPSET = 17
IR_VERSION = 8


class _GraphBuilder:
    """Accumulates nodes and initializers; names are unique because every layer has a prefix."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def _param(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(self, x: str, name: str, in_ch: int, out_ch: int, kernel: int, stride: int) -> str:
        # torchvision initialises convolutions with Kaiming normal, mode="fan_out", for ReLU.
        std = np.sqrt(2.0 / (out_ch * kernel * kernel))
        weight = self._param(f"{name}.weight", self.rng.normal(0.0, std, (out_ch, in_ch, kernel, kernel)))
        pad = kernel // 2
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, weight],
                [name],
                name=name,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
            )
        )
        return name

    def batch_norm(self, x: str, name: str, channels: int) -> str:
        # Random running statistics near the identity, so the BatchNormalization nodes are not no-ops
        # (the in-process vs Triton comparison then exercises them) while activations stay bounded.
        scale = self._param(f"{name}.weight", self.rng.uniform(0.8, 1.2, channels))
        bias = self._param(f"{name}.bias", self.rng.normal(0.0, 0.05, channels))
        mean = self._param(f"{name}.running_mean", self.rng.normal(0.0, 0.05, channels))
        var = self._param(f"{name}.running_var", self.rng.uniform(0.8, 1.2, channels))
        self.nodes.append(
            helper.make_node("BatchNormalization", [x, scale, bias, mean, var], [name], name=name, epsilon=1e-5)
        )
        return name

    def relu(self, x: str, name: str) -> str:
        self.nodes.append(helper.make_node("Relu", [x], [name], name=name))
        return name

    def add(self, a: str, b: str, name: str) -> str:
        self.nodes.append(helper.make_node("Add", [a, b], [name], name=name))
        return name

    def basic_block(self, x: str, name: str, in_ch: int, out_ch: int, stride: int) -> str:
        out = self.conv(x, f"{name}.conv1", in_ch, out_ch, 3, stride)
        out = self.relu(self.batch_norm(out, f"{name}.bn1", out_ch), f"{name}.relu1")
        out = self.batch_norm(self.conv(out, f"{name}.conv2", out_ch, out_ch, 3, 1), f"{name}.bn2", out_ch)
        identity = x
        if stride != 1 or in_ch != out_ch:
            identity = self.conv(x, f"{name}.downsample.0", in_ch, out_ch, 1, stride)
            identity = self.batch_norm(identity, f"{name}.downsample.1", out_ch)
        return self.relu(self.add(out, identity, f"{name}.add"), f"{name}.relu2")


def build_resnet18(seed: int = 0) -> onnx.ModelProto:
    """ResNet18 (He et al. 2015, torchvision layout) with weights drawn from a generator seeded by `seed`."""
    g = _GraphBuilder(np.random.default_rng(seed))
    x = g.conv(INPUT_NAME, "conv1", 3, 64, 7, 2)
    x = g.relu(g.batch_norm(x, "bn1", 64), "relu")
    g.nodes.append(
        helper.make_node(
            "MaxPool", [x], ["maxpool"], name="maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
        )
    )
    x, in_ch = "maxpool", 64
    for stage, (out_ch, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
        for block in range(2):
            x = g.basic_block(x, f"layer{stage}.{block}", in_ch, out_ch, stride if block == 0 else 1)
            in_ch = out_ch
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], ["avgpool"], name="avgpool"))
    g.nodes.append(helper.make_node("Flatten", ["avgpool"], ["flatten"], name="flatten", axis=1))
    # torch.nn.Linear's default initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / np.sqrt(512)
    fc_w = g._param("fc.weight", g.rng.uniform(-bound, bound, (NUM_CLASSES, 512)))
    fc_b = g._param("fc.bias", g.rng.uniform(-bound, bound, NUM_CLASSES))
    g.nodes.append(helper.make_node("Gemm", ["flatten", fc_w, fc_b], [OUTPUT_NAME], name="fc", transB=1))

    graph = helper.make_graph(
        g.nodes,
        "resnet18",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", *IMAGE_SHAPE])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="servegrid.models.resnet18",
        doc_string=f"ResNet18 architecture with seeded random weights (seed={seed}); outputs are meaningless.",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def trainable_parameter_count(model: onnx.ModelProto) -> int:
    """Parameters a framework would train (BatchNorm running statistics excluded), for checking the layout."""
    return sum(
        int(np.prod(t.dims)) for t in model.graph.initializer if not t.name.endswith(("running_mean", "running_var"))
    )
