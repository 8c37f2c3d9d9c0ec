"""How CLI commands reach the public API: Envoy's address, a credential, and error reporting."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import grpc
import typer
from servegrid.gateway.v1 import gateway_pb2_grpc

from services.cli.errors import exit_on_rpc_error
from services.stack.local import StackSettings, dev_issuer

TargetOpt = Annotated[str, typer.Option(envvar="SERVEGRID_TARGET", help="Envoy's address (default: the local one).")]
TokenOpt = Annotated[str, typer.Option(envvar="SERVEGRID_TOKEN", help="JWT; default: a dev token.")]
ApiKeyOpt = Annotated[str, typer.Option(envvar="SERVEGRID_API_KEY", help="API key instead of a JWT.")]

Metadata = list[tuple[str, str]]


@contextmanager
def gateway(
    target: str, token: str, api_key: str = ""
) -> Iterator[tuple[gateway_pb2_grpc.GatewayServiceStub, Metadata]]:
    """A stub through Envoy and the metadata carrying the credential (a dev token when none is given)."""
    settings = StackSettings()
    address = target or f"{settings.host}:{settings.envoy_port}"
    if api_key:
        metadata = [("x-api-key", api_key)]
    else:
        metadata = [("authorization", f"Bearer {token or dev_issuer(settings).token(settings.dev_tenant)}")]
    options = [("grpc.max_send_message_length", 256 << 20)]
    with grpc.insecure_channel(address, options=options) as channel, exit_on_rpc_error():
        yield gateway_pb2_grpc.GatewayServiceStub(channel), metadata
