"""The one way a servegrid component opens a gRPC channel to another: mutual TLS when configured, tracing always."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from services.runtime.tls import CertFiles, channel_credentials
from services.runtime.tracing import client_interceptors

Options = Sequence[tuple[str, Any]]


def _secure_options(options: Options, tls: CertFiles | None, peer: str) -> list[tuple[str, Any]]:
    out = list(options)
    if tls is not None and peer:
        # Verify the server as the component it must be (its certificate's name), whatever address
        # reaches it: 127.0.0.1 locally, a Service's DNS name on Kubernetes.
        out.append(("grpc.ssl_target_name_override", peer))
    return out


def open_channel(
    address: str, *, tls: CertFiles | None = None, peer: str = "", options: Options = (), tracing: bool = True
) -> grpc.aio.Channel:
    """A grpc.aio channel to `address`, presenting this component's certificate when `tls` is given.

    `peer` is the component expected on the other end (`envoy`, `registry`, ...): with TLS its
    certificate must name it. Without `tls` the channel is plaintext (tests, deployments without mTLS).
    """
    interceptors = client_interceptors() if tracing else []
    opts = _secure_options(options, tls, peer)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)
    return grpc.aio.secure_channel(address, channel_credentials(tls), options=opts, interceptors=interceptors)


def open_sync_channel(
    address: str, *, tls: CertFiles | None = None, peer: str = "", options: Options = ()
) -> grpc.Channel:
    """The blocking twin of `open_channel`, for command-line tools and readiness checks."""
    opts = _secure_options(options, tls, peer)
    if tls is None:
        return grpc.insecure_channel(address, options=opts)
    return grpc.secure_channel(address, channel_credentials(tls), options=opts)
