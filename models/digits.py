"""Train the `digits` classifier on scikit-learn's bundled digits data and export it to ONNX."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

INPUT_NAME = "pixels"
LABEL_NAME = "label"
PROBABILITIES_NAME = "probabilities"
NUM_FEATURES = 64
NUM_CLASSES = 10
TEST_SIZE = 0.25
RANDOM_STATE = 0
OPSET = 17
ML_OPSET = 3
IR_VERSION = 8  # Triton 2.51's onnxruntime reads IR <= 10; 8 matches opset 17.


@dataclass(frozen=True)
class HeldOutSplit:
    """The test rows the classifier never saw: pixels 0..16 as FP32 [n, 64], labels INT64 [n]."""

    pixels: np.ndarray
    labels: np.ndarray

    def save(self, path: Path) -> None:
        np.savez_compressed(path, pixels=self.pixels, labels=self.labels)

    @classmethod
    def load(cls, path: Path) -> HeldOutSplit:
        with np.load(path) as data:
            return cls(pixels=data["pixels"], labels=data["labels"])


@dataclass(frozen=True)
class TrainedDigits:
    model: onnx.ModelProto
    held_out: HeldOutSplit
    test_accuracy: float  # scikit-learn's own score on the held-out split, for the build manifest


def train_digits() -> TrainedDigits:
    """Fit StandardScaler + LogisticRegression on a fixed, stratified 75/25 split and convert it with skl2onnx."""
    # Imported here so that importing the models package (e.g. for config rendering) stays light.
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType, Int64TensorType
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32),
        y.astype(np.int64),
        test_size=TEST_SIZE,
        random_state=RANDOM_STATE,
        stratify=y,
    )
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=RANDOM_STATE))
    classifier.fit(x_train, y_train)
    model = to_onnx(
        classifier,
        initial_types=[(INPUT_NAME, FloatTensorType([None, NUM_FEATURES]))],
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
        # zipmap=False gives a plain [n, 10] tensor instead of a sequence of maps Triton cannot serve.
        options={id(classifier): {"zipmap": False}},
        final_types=[
            (LABEL_NAME, Int64TensorType([None])),
            (PROBABILITIES_NAME, FloatTensorType([None, NUM_CLASSES])),
        ],
    )
    model = _label_as_column(model)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return TrainedDigits(
        model=model,
        held_out=HeldOutSplit(pixels=x_test, labels=y_test),
        test_accuracy=float(classifier.score(x_test, y_test)),
    )


def _label_as_column(model: onnx.ModelProto) -> onnx.ModelProto:
    """Reshape `label` from [n] to [n, 1].

    A batched Triton model declares per-item dims without the batch dimension, and an empty dims list is
    not allowed; [n, 1] lets both the Python backend and the native onnxruntime backend serve the file as
    is, with `dims: [1]`, instead of relying on a `reshape` that only some backends apply.
    """
    graph = model.graph
    flat = f"{LABEL_NAME}_flat"
    for node in graph.node:
        node.output[:] = [flat if name == LABEL_NAME else name for name in node.output]
    graph.initializer.append(helper.make_tensor("label_axes", TensorProto.INT64, [1], [1]))
    graph.node.append(helper.make_node("Unsqueeze", [flat, "label_axes"], [LABEL_NAME], name="label_column"))
    for output in graph.output:
        if output.name == LABEL_NAME:
            output.CopyFrom(helper.make_tensor_value_info(LABEL_NAME, TensorProto.INT64, [None, 1]))
    return model
