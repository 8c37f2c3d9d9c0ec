"""`servegrid infer MODEL --input file.json`: one inference through Envoy, the way any client calls."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf import json_format
from servegrid.gateway.v1 import gateway_pb2

from services.cli.gateway import ApiKeyOpt, TargetOpt, TokenOpt, gateway
from services.runtime.tensors import bare_data_hint


def infer(
    model: Annotated[str, typer.Argument(help="Model id, e.g. digits.")],
    input: Annotated[
        Path,
        typer.Option(
            "--input", "-i", help='JSON file: {"inputs": [{"name", "datatype", "shape", "data": {...}}]}; - for stdin.'
        ),
    ],
    version: Annotated[int, typer.Option(help="A specific version; 0 follows the traffic policy.")] = 0,
    target: TargetOpt = "",
    token: TokenOpt = "",
    api_key: ApiKeyOpt = "",
    timeout_s: Annotated[float, typer.Option(help="Deadline in seconds.")] = 30.0,
) -> None:
    """Run one inference and print the answer as JSON."""
    try:
        text = sys.stdin.read() if str(input) == "-" else input.read_text()
    except OSError as err:
        raise typer.BadParameter(f"cannot read {input}: {err.strerror or err}", param_hint="--input") from None
    request = gateway_pb2.InferRequest()
    try:
        json_format.Parse(text, request)
    except json_format.ParseError as err:
        raise typer.BadParameter(f"{input}: {bare_data_hint(text) or err}", param_hint="--input") from None
    request.model_id, request.version = model, version or request.version
    with gateway(target, token, api_key) as (stub, metadata):
        reply = stub.Infer(request, timeout=timeout_s, metadata=metadata)
    print(json.dumps(json_format.MessageToDict(reply), indent=2))
