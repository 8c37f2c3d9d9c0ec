"""`servegrid infer MODEL --input file.json`: one inference through Envoy, the way any client calls."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import grpc
import typer
from google.protobuf import json_format
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from services.cli.errors import exit_on_rpc_error
from services.stack.local import StackSettings, dev_issuer


def infer(
    model: Annotated[str, typer.Argument(help="Model id, e.g. digits.")],
    input: Annotated[
        Path,
        typer.Option(
            "--input", "-i", help='JSON file: {"inputs": [{"name", "datatype", "shape", "data": {...}}]}; - for stdin.'
        ),
    ],
    version: Annotated[int, typer.Option(help="A specific version; 0 follows the traffic policy.")] = 0,
    target: Annotated[str, typer.Option(envvar="SERVEGRID_TARGET", help="Envoy's address.")] = "",
    token: Annotated[str, typer.Option(envvar="SERVEGRID_TOKEN", help="JWT; default: a dev token.")] = "",
    api_key: Annotated[str, typer.Option(envvar="SERVEGRID_API_KEY", help="API key instead of a JWT.")] = "",
    timeout_s: Annotated[float, typer.Option(help="Deadline in seconds.")] = 30.0,
) -> None:
    """Run one inference and print the answer as JSON."""
    settings = StackSettings()
    text = sys.stdin.read() if str(input) == "-" else input.read_text()
    request = gateway_pb2.InferRequest()
    try:
        json_format.Parse(text, request)
    except json_format.ParseError as err:
        raise typer.BadParameter(f"{input}: {err}") from None
    request.model_id, request.version = model, version or request.version
    metadata = [("x-api-key", api_key)] if api_key else []
    if not api_key:
        metadata = [("authorization", f"Bearer {token or dev_issuer(settings).token(settings.dev_tenant)}")]
    address = target or f"{settings.host}:{settings.envoy_port}"
    with grpc.insecure_channel(address) as channel, exit_on_rpc_error():
        reply = gateway_pb2_grpc.GatewayServiceStub(channel).Infer(request, timeout=timeout_s, metadata=metadata)
    print(json.dumps(json_format.MessageToDict(reply), indent=2))
