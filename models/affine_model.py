"""Triton Python-backend model computing y = 2x + 1 with numpy (copied as model.py for affine models)."""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

_TWO = np.float32(2)
_ONE = np.float32(1)


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        # Per request, not merged: for four floats the concatenate/split would cost more than it saves;
        # what dynamic batching buys here is one Triton <-> stub round trip for many requests.
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("y", x * _TWO + _ONE)]))
        return responses
