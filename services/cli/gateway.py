"""How CLI commands reach the public API: Envoy's address, a credential, and error reporting."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import grpc
import typer
from servegrid.gateway.v1 import gateway_pb2_grpc

from servegrid_sdk import ApiKeyCredential
from services.cli.errors import exit_on_rpc_error
from services.stack.local import StackSettings, dev_issuer, public_grpc_credentials

TargetOpt = Annotated[
    str,
    typer.Option(
        envvar="SERVEGRID_TARGET",
        help="Envoy's address (default: the local one). Spoken over TLS, verified with SERVEGRID_CA_FILE or the "
        "local CA (.servegrid/certs/ca.crt), unless SERVEGRID_STACK_PUBLIC_TLS=false.",
    ),
]
TokenOpt = Annotated[str, typer.Option(envvar="SERVEGRID_TOKEN", help="JWT; default: a dev token.")]
ApiKeyOpt = Annotated[
    str,
    typer.Option(
        envvar="SERVEGRID_API_KEY",
        help="API key instead of a JWT (exchanged for a short-lived token, as the SDK does).",
    ),
]

Metadata = list[tuple[str, str]]


@contextmanager
def gateway(
    target: str, token: str, api_key: str = ""
) -> Iterator[tuple[gateway_pb2_grpc.GatewayServiceStub, Metadata]]:
    """A stub through Envoy and the metadata carrying the credential (a dev token when none is given)."""
    settings = StackSettings()
    address = target or f"{settings.host}:{settings.envoy_port}"
    options = [("grpc.max_send_message_length", 256 << 20)]
    # TLS with the local stack's CA (or SERVEGRID_CA_FILE's) unless the stack runs plain HTTP.
    credentials = public_grpc_credentials(settings)
    channel = (
        grpc.secure_channel(address, credentials, options=options)
        if credentials
        else grpc.insecure_channel(address, options=options)
    )
    with channel, exit_on_rpc_error():
        if api_key:
            # The SDK's exchange: one key check for the token, then Envoy verifies the token itself
            # (a server without the exchange gets the key on each call instead).
            metadata = ApiKeyCredential(channel, api_key).metadata(timeout_s=10)
        else:
            metadata = [("authorization", f"Bearer {token or dev_issuer(settings).token(settings.dev_tenant)}")]
        yield gateway_pb2_grpc.GatewayServiceStub(channel), metadata
