"""Triton Python-backend model that serves the model.onnx beside it with onnxruntime (copied as model.py)."""

# This file is copied into <model>/<version>/model.py for every ONNX model when the repository is
# rendered for the Python backend (the only backend in the pytriton wheel). On a Triton image with the
# native onnxruntime backend the same model.onnx is served without it. It therefore reads everything
# model-specific (tensor names, dtypes, batching, thread counts) from the model's config.pbtxt.

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self._name = args["model_name"]
        version_dir = Path(args["model_repository"]) / args["model_version"]
        # Not config["default_model_filename"]: on the Python backend that names this model.py.
        model_file = version_dir / "model.onnx"
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}

        options = ort.SessionOptions()
        # Same parameter names as Triton's onnxruntime backend, so one config works for both.
        if threads := int(parameters.get("intra_op_thread_count", "0")):
            options.intra_op_num_threads = threads
        if threads := int(parameters.get("inter_op_thread_count", "0")):
            options.inter_op_num_threads = threads
        self._session = ort.InferenceSession(
            str(model_file), options, providers=self._providers(args["model_instance_kind"], args)
        )

        self._inputs = [tensor["name"] for tensor in config["input"]]
        self._outputs = [tensor["name"] for tensor in config["output"]]
        self._batched = int(config.get("max_batch_size", 0)) > 0
        # Fail the load, not every request, when config.pbtxt and the ONNX graph disagree.
        graph_inputs = {i.name for i in self._session.get_inputs()}
        graph_outputs = {o.name for o in self._session.get_outputs()}
        if set(self._inputs) != graph_inputs or not set(self._outputs) <= graph_outputs:
            raise pb_utils.TritonModelException(
                f"{self._name}: config.pbtxt tensors {self._inputs} -> {self._outputs} do not match "
                f"{model_file.name}: {sorted(graph_inputs)} -> {sorted(graph_outputs)}"
            )

    def _providers(self, instance_kind: str, args: dict[str, str]) -> list[Any]:
        if instance_kind == "GPU":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                device = {"device_id": int(args["model_instance_device_id"])}
                return [("CUDAExecutionProvider", device), "CPUExecutionProvider"]
            pb_utils.Logger.log_warn(
                f"{self._name}: KIND_GPU instance but this onnxruntime has no CUDA provider; running on CPU"
            )
        return ["CPUExecutionProvider"]

    def execute(self, requests: list[Any]) -> list[Any]:
        feeds = [
            {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self._inputs}
            for request in requests
        ]
        if self._batched and len(requests) > 1:
            try:
                results = self._run_merged(feeds)
            except Exception:
                # One malformed request must not fail the others the dynamic batcher merged with it.
                results = [self._run_one(feed) for feed in feeds]
        else:
            results = [self._run_one(feed) for feed in feeds]
        return [self._response(request, result) for request, result in zip(requests, results, strict=True)]

    def _run_one(self, feed: dict[str, np.ndarray]) -> list[np.ndarray] | Exception:
        try:
            return list(self._session.run(self._outputs, feed))
        except Exception as error:  # reported to that request's caller, not raised into Triton
            return error

    def _run_merged(self, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray] | Exception]:
        """Run the requests the dynamic batcher handed over as one batch, then split the outputs back."""
        sizes = [len(feed[self._inputs[0]]) for feed in feeds]
        merged = {name: np.concatenate([feed[name] for feed in feeds]) for name in self._inputs}
        outputs = self._session.run(self._outputs, merged)
        bounds = np.cumsum(sizes)[:-1]
        per_output = [np.split(output, bounds) for output in outputs]
        return [[parts[i] for parts in per_output] for i in range(len(feeds))]

    def _response(self, request: Any, result: list[np.ndarray] | Exception) -> Any:
        if isinstance(result, Exception):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self._name}: {result}"))
        wanted = request.requested_output_names() or self._outputs
        tensors = [
            pb_utils.Tensor(name, value) for name, value in zip(self._outputs, result, strict=True) if name in wanted
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)
